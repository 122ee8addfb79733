// The pz snippet. A page carries its minified form inline in <head>, then calls
// pz.init(...) right away:
//
//   <script>/* minified snippet */</script>
//   <script>pz.init({writeKey: 'demo', endpoint: '/v1/fb'});</script>
//
// `cargo xtask build-tracker` minifies it with a pinned terser into www/t/snippet.min.js (the
// file a site copies) and writes it inline into every demo page (www/*.html), between the
// "pz tracker snippet" BEGIN and END markers. After editing this file, run that command and
// commit the pages: `cargo xtask test` fails while a page carries another version.
//
// It defines window.pz with one stub per API method; each call is queued as
// [name, arguments, time]. It then loads <base>pz.js asynchronously (base: the last
// argument, '/t/' by default), which loads the wasm, replays the queue in order and replaces
// the stubs. The page never waits for the tracker and no call made before it loads is lost.
(function (w, d, base) {
  var pz = w.pz = w.pz || {};
  if (pz.q) return; // the snippet ran twice, or the tracker is already there
  pz.q = [];
  'init page track identify alias productViewed cartAdd cartRemove checkoutStarted orderCompleted consent flush reset'
    .split(' ')
    .forEach(function (name) {
      pz[name] = function () {
        pz.q.push([name, [].slice.call(arguments), Date.now()]);
      };
    });
  var s = d.createElement('script');
  s.async = true;
  s.src = base + 'pz.js';
  (d.head || d.documentElement).appendChild(s);
})(window, document, '/t/');
