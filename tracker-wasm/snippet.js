// The pz snippet: paste its minified form (www/t/snippet.min.js, built by
// `cargo xtask build-tracker`) inline into every page, then call pz.init(...) right away:
//
//   <script>/* snippet.min.js */</script>
//   <script>pz.init({writeKey: 'demo', endpoint: '/v1/fb'});</script>
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
