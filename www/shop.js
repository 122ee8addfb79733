/*
 * Demo shop: catalogue, cart, shared header/footer and small helpers, exposed as `window.Shop`.
 *
 * The cart and the "logged in" user are shop state kept in localStorage by the shop itself
 * (they are not tracking data). Tracking goes through `Shop.pz(method, ...args)`, which calls
 * `window.pz[method]` when the tracker (or its snippet stub) provides it and never throws into
 * the page, so pages keep working when /t/ is missing.
 *
 * Loaded at the end of <body> on every page, after the tracker snippet and consent.js.
 */
(function () {
  'use strict';

  var CURRENCY = 'EUR';
  var SHOP_NAME = 'Lumen Supply';

  // ---------------------------------------------------------------- catalogue

  var CATEGORIES = [
    { id: 'shoes', name: 'Shoes', blurb: 'Trainers, sneakers and boots made to be worn in.', hue: 14 },
    { id: 'bags', name: 'Bags', blurb: 'Totes, backpacks and duffels for every day and every trip.', hue: 36 },
    { id: 'apparel', name: 'Apparel', blurb: 'Tees, knits and shells in natural fibres.', hue: 210 },
    { id: 'watches', name: 'Watches', blurb: 'Mechanical and quartz watches with honest design.', hue: 260 },
    { id: 'home', name: 'Home', blurb: 'Stoneware, lamps and throws for slower mornings.', hue: 150 },
    { id: 'outdoor', name: 'Outdoor', blurb: 'Light, tough kit for trails and campsites.', hue: 95 }
  ];

  // Prices are integer cents (EUR).
  var PRODUCTS = [
    { id: 'sku-shoes-001', category: 'shoes', name: 'Trail Runner', price: 8900, hue: 14, featured: true, badge: 'Bestseller',
      description: 'Grippy lugs, a rock plate and a roomy toe box: a trail shoe that also does the school run.' },
    { id: 'sku-shoes-002', category: 'shoes', name: 'City Sneaker', price: 7400, hue: 200,
      description: 'Clean leather upper on a cushioned cupsole. Goes with everything you own.' },
    { id: 'sku-shoes-003', category: 'shoes', name: 'Canvas Low', price: 4900, hue: 48,
      description: 'Organic cotton canvas, natural rubber sole, nothing you do not need.' },
    { id: 'sku-shoes-004', category: 'shoes', name: 'Leather Chelsea Boot', price: 15900, hue: 25, badge: 'New',
      description: 'Full-grain leather, elastic gussets and a Goodyear-welted sole you can resole for years.' },

    { id: 'sku-bags-001', category: 'bags', name: 'Everyday Tote', price: 5900, hue: 36, featured: true,
      description: 'Heavy waxed canvas with an inside zip pocket and handles long enough for a shoulder.' },
    { id: 'sku-bags-002', category: 'bags', name: 'Roll-top Backpack', price: 9900, hue: 190, badge: 'Waterproof', featured: true,
      description: '22 litres, welded seams and a padded 16" laptop sleeve. Rain stays outside.' },
    { id: 'sku-bags-003', category: 'bags', name: 'Weekender Duffel', price: 12900, hue: 330,
      description: 'Fits cabin limits, opens wide like a doctor\'s bag, carries like a backpack.' },
    { id: 'sku-bags-004', category: 'bags', name: 'Crossbody Sling', price: 3900, hue: 280,
      description: 'Phone, keys, wallet and a snack. Adjusts from chest to hip in one pull.' },

    { id: 'sku-apparel-001', category: 'apparel', name: 'Organic Tee', price: 2500, hue: 210, featured: true,
      description: 'Mid-weight organic cotton jersey that keeps its shape wash after wash.' },
    { id: 'sku-apparel-002', category: 'apparel', name: 'Merino Crew', price: 7900, hue: 0,
      description: 'Fine-gauge merino: warm in the cold, cool in the heat, never itchy.' },
    { id: 'sku-apparel-003', category: 'apparel', name: 'Rain Shell', price: 13900, hue: 175, badge: 'New',
      description: 'Three-layer waterproof shell with pit zips and a helmet-friendly hood.' },
    { id: 'sku-apparel-004', category: 'apparel', name: 'Linen Shirt', price: 5900, hue: 40,
      description: 'Washed European linen, relaxed fit, mother-of-pearl buttons.' },

    { id: 'sku-watches-001', category: 'watches', name: 'Field Watch', price: 18900, hue: 95, featured: true,
      description: '38 mm steel case, luminous hands and 100 m water resistance on a canvas strap.' },
    { id: 'sku-watches-002', category: 'watches', name: 'Minimal 36', price: 12900, hue: 230,
      description: 'A quiet dial, a sapphire crystal and a slim 7 mm case.' },
    { id: 'sku-watches-003', category: 'watches', name: 'Diver 200', price: 24900, hue: 205, badge: 'Limited',
      description: 'Automatic movement, unidirectional bezel, 200 m water resistance.' },
    { id: 'sku-watches-004', category: 'watches', name: 'Chrono Steel', price: 29900, hue: 260,
      description: 'Two-register chronograph with a tachymeter bezel and a brushed bracelet.' },

    { id: 'sku-home-001', category: 'home', name: 'Stoneware Mug', price: 1800, hue: 150, featured: true,
      description: 'Hand-glazed stoneware, 350 ml, dishwasher safe. Each one is a little different.' },
    { id: 'sku-home-002', category: 'home', name: 'Pour-over Set', price: 4500, hue: 20,
      description: 'Ceramic dripper, glass carafe and 100 filters for a slow, clean cup.' },
    { id: 'sku-home-003', category: 'home', name: 'Desk Lamp', price: 6900, hue: 50, badge: 'New', glyph: 'lamp',
      description: 'Warm dimmable LED on an articulated steel arm. Lights the page, not your eyes.' },
    { id: 'sku-home-004', category: 'home', name: 'Wool Throw', price: 8900, hue: 340,
      description: 'Lambswool woven in Wales, 130 × 180 cm, fringed ends.' },

    { id: 'sku-outdoor-001', category: 'outdoor', name: 'Insulated Bottle', price: 2900, hue: 95, featured: true, glyph: 'bottle',
      description: 'Keeps drinks cold for 24 hours and hot for 12. Leak-proof lid, 750 ml.' },
    { id: 'sku-outdoor-002', category: 'outdoor', name: 'Trekking Poles', price: 6900, hue: 185,
      description: 'Carbon, 280 g a pair, folding in three, cork grips.' },
    { id: 'sku-outdoor-003', category: 'outdoor', name: 'Headlamp 400', price: 3900, hue: 30,
      description: '400 lumens, red night mode, USB-C rechargeable, 60 g.' },
    { id: 'sku-outdoor-004', category: 'outdoor', name: 'Two-person Tent', price: 27900, hue: 120, badge: 'Bestseller', featured: true,
      description: 'Freestanding, 1.6 kg packed, two doors, pitches in four minutes.' }
  ];

  var productsById = {};
  PRODUCTS.forEach(function (p) { productsById[p.id] = p; });
  var categoriesById = {};
  CATEGORIES.forEach(function (c) { categoriesById[c.id] = c; });

  function product(id) { return Object.prototype.hasOwnProperty.call(productsById, id) ? productsById[id] : null; }
  function category(id) { return Object.prototype.hasOwnProperty.call(categoriesById, id) ? categoriesById[id] : null; }
  function productsIn(categoryId) { return PRODUCTS.filter(function (p) { return p.category === categoryId; }); }
  function featured() { return PRODUCTS.filter(function (p) { return p.featured; }); }

  // ---------------------------------------------------------------- helpers

  function esc(value) {
    return String(value == null ? '' : value).replace(/[&<>"']/g, function (ch) {
      return { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[ch];
    });
  }

  var moneyFormat = (function () {
    try {
      return new Intl.NumberFormat('en-IE', { style: 'currency', currency: CURRENCY });
    } catch (e) {
      return { format: function (n) { return '€' + n.toFixed(2); } };
    }
  })();

  /** Formats integer cents as money, e.g. 8900 -> "€89.00". */
  function money(cents, currency) {
    if (currency && currency !== CURRENCY) {
      try {
        return new Intl.NumberFormat('en-IE', { style: 'currency', currency: currency }).format(cents / 100);
      } catch (e) { /* unknown code: fall through */ }
    }
    return moneyFormat.format(cents / 100);
  }

  function param(name) {
    try { return new URLSearchParams(window.location.search).get(name); } catch (e) { return null; }
  }

  /** Calls `window.pz[method](...args)` when available; never throws into the page. */
  function pz(method) {
    var args = Array.prototype.slice.call(arguments, 1);
    try {
      var t = window.pz;
      if (t && typeof t[method] === 'function') return t[method].apply(t, args);
    } catch (e) {
      if (window.console) console.warn('[shop] pz.' + method + ' failed:', e);
    }
    return undefined;
  }

  // localStorage with an in-memory fallback (private mode, storage disabled).
  var memory = {};
  var store = {
    get: function (key) {
      var raw;
      try { raw = window.localStorage.getItem(key); } catch (e) { raw = memory[key]; }
      if (raw == null) return null;
      try { return JSON.parse(raw); } catch (e) { return null; }
    },
    set: function (key, value) {
      var raw = JSON.stringify(value);
      try { window.localStorage.setItem(key, raw); } catch (e) { memory[key] = raw; }
    },
    remove: function (key) {
      try { window.localStorage.removeItem(key); } catch (e) { /* ignore */ }
      delete memory[key];
    }
  };

  // ---------------------------------------------------------------- product images (inline SVG)

  var GLYPHS = {
    shoes:
      '<path d="M14 60c0-7 5-10 12-10h13c6 0 9-6 11-13l9 2c2 9 10 14 22 17 8 2 10 8 8 13H17c-2 0-3-2-3-4z" fill="#fff" fill-opacity=".92"/>' +
      '<path d="M15 67h72v5c0 2-1 3-3 3H18c-2 0-3-1-3-3z" fill="#000" fill-opacity=".25"/>' +
      '<path d="M44 46l4 3M47 42l4 3M50 38l4 3" stroke="#000" stroke-opacity=".25" stroke-width="2" stroke-linecap="round"/>',
    bags:
      '<path d="M38 38v-6a12 12 0 0 1 24 0v6" fill="none" stroke="#fff" stroke-opacity=".92" stroke-width="5" stroke-linecap="round"/>' +
      '<path d="M24 38h52l-5 40H29z" fill="#fff" fill-opacity=".92"/>' +
      '<path d="M30 48h40" stroke="#000" stroke-opacity=".18" stroke-width="3"/>',
    apparel:
      '<path d="M37 22L18 32l7 14 8-4v36h34V42l8 4 7-14-19-10c-2 6-7 9-13 9s-11-3-13-9z" fill="#fff" fill-opacity=".92"/>' +
      '<path d="M37 22c2 6 7 9 13 9s11-3 13-9" fill="none" stroke="#000" stroke-opacity=".2" stroke-width="2"/>',
    watches:
      '<rect x="40" y="14" width="20" height="72" rx="6" fill="#000" fill-opacity=".22"/>' +
      '<circle cx="50" cy="50" r="22" fill="#fff" fill-opacity=".95"/>' +
      '<circle cx="50" cy="50" r="17" fill="none" stroke="#000" stroke-opacity=".15" stroke-width="2"/>' +
      '<path d="M50 50V37M50 50l9 5" stroke="#1d1d1f" stroke-width="3" stroke-linecap="round"/>' +
      '<rect x="71" y="47" width="4" height="6" rx="1" fill="#fff" fill-opacity=".9"/>',
    home:
      '<path d="M28 38h36v30a10 10 0 0 1-10 10H38a10 10 0 0 1-10-10z" fill="#fff" fill-opacity=".92"/>' +
      '<path d="M64 45h4a8 8 0 0 1 0 16h-4" fill="none" stroke="#fff" stroke-opacity=".92" stroke-width="5"/>' +
      '<path d="M38 20c-3 4 3 6 0 10M47 18c-3 4 3 6 0 10M56 20c-3 4 3 6 0 10" fill="none" stroke="#fff" stroke-opacity=".7" stroke-width="2.5" stroke-linecap="round"/>',
    outdoor:
      '<path d="M50 22L14 78h72z" fill="#fff" fill-opacity=".92"/>' +
      '<path d="M50 50l-10 28h20z" fill="#000" fill-opacity=".25"/>' +
      '<path d="M50 22v-6M8 78h84" stroke="#fff" stroke-opacity=".9" stroke-width="3" stroke-linecap="round"/>',
    bottle:
      '<rect x="41" y="15" width="18" height="11" rx="3" fill="#000" fill-opacity=".28"/>' +
      '<rect x="37" y="25" width="26" height="60" rx="10" fill="#fff" fill-opacity=".92"/>' +
      '<path d="M37 44h26M37 66h26" stroke="#000" stroke-opacity=".14" stroke-width="3"/>',
    lamp:
      '<path d="M30 82h32" stroke="#fff" stroke-opacity=".92" stroke-width="6" stroke-linecap="round"/>' +
      '<path d="M46 82L38 50l24-20" fill="none" stroke="#fff" stroke-opacity=".92" stroke-width="4" stroke-linecap="round" stroke-linejoin="round"/>' +
      '<path d="M56 22l22 14-12 12z" fill="#fff" fill-opacity=".92"/>' +
      '<path d="M70 46l8 8M64 50l3 10" stroke="#fff" stroke-opacity=".55" stroke-width="2.5" stroke-linecap="round"/>'
  };

  var svgCounter = 0;

  /** An inline SVG illustration: a gradient in the product's hue with its category's glyph. */
  function image(item, label) {
    var hue = typeof item.hue === 'number' ? item.hue : 200;
    var glyph = GLYPHS[item.glyph] || GLYPHS[item.category] || GLYPHS.home;
    var gid = 'g' + (++svgCounter);
    return '<svg viewBox="0 0 100 100" role="img" aria-label="' + esc(label || item.name) + '" xmlns="http://www.w3.org/2000/svg">' +
      '<defs><linearGradient id="' + gid + '" x1="0" y1="0" x2="1" y2="1">' +
      '<stop offset="0" stop-color="hsl(' + hue + ' 62% 72%)"/>' +
      '<stop offset="1" stop-color="hsl(' + ((hue + 40) % 360) + ' 48% 46%)"/>' +
      '</linearGradient></defs>' +
      '<rect width="100" height="100" fill="url(#' + gid + ')"/>' +
      '<circle cx="80" cy="18" r="26" fill="#fff" fill-opacity=".12"/>' +
      glyph + '</svg>';
  }

  /** A product card linking to the product page (`a[data-product-id]`). */
  function productCard(p) {
    var cat = category(p.category);
    return '<article class="card" data-testid="product-card">' +
      '<a class="card__link" href="product.html?id=' + encodeURIComponent(p.id) + '" data-product-id="' + esc(p.id) + '">' +
      '<div class="card__media media">' + image(p) +
      (p.badge ? '<span class="card__badge">' + esc(p.badge) + '</span>' : '') + '</div>' +
      '<div class="card__body"><h3 class="card__title">' + esc(p.name) + '</h3>' +
      '<p class="card__meta">' + esc(cat ? cat.name : p.category) + '</p>' +
      '<p class="card__price">' + money(p.price) + '</p></div></a></article>';
  }

  // ---------------------------------------------------------------- tracker items

  /** The tracker's item shape: {productId, category, price (cents), quantity, name}. */
  function item(p, quantity) {
    return { productId: p.id, category: p.category, price: p.price, quantity: quantity, name: p.name };
  }

  // ---------------------------------------------------------------- cart (shop state)

  var CART_KEY = 'shop.cart';
  var MAX_QTY = 99;

  /** The cart as [{productId, quantity}], unknown products and bad quantities dropped. */
  function cart() {
    var raw = store.get(CART_KEY);
    if (!Array.isArray(raw)) return [];
    return raw.filter(function (l) {
      return l && product(l.productId) && Number.isInteger(l.quantity) && l.quantity > 0;
    }).map(function (l) { return { productId: l.productId, quantity: Math.min(l.quantity, MAX_QTY) }; });
  }

  function saveCart(lines) {
    store.set(CART_KEY, lines);
    updateCartCount();
    document.dispatchEvent(new CustomEvent('shop:cart', { detail: lines }));
  }

  /** Adds `quantity` of a product; returns how many were actually added (0 at the cap). */
  function cartAdd(productId, quantity) {
    var lines = cart();
    var line = lines.find(function (l) { return l.productId === productId; });
    if (!line) { line = { productId: productId, quantity: 0 }; lines.push(line); }
    var added = Math.max(0, Math.min(quantity, MAX_QTY - line.quantity));
    line.quantity += added;
    saveCart(lines.filter(function (l) { return l.quantity > 0; }));
    return added;
  }

  /** Removes `quantity` of a product (all of it when omitted); returns how many were removed. */
  function cartRemove(productId, quantity) {
    var lines = cart();
    var line = lines.find(function (l) { return l.productId === productId; });
    if (!line) return 0;
    var removed = quantity == null ? line.quantity : Math.min(quantity, line.quantity);
    line.quantity -= removed;
    saveCart(lines.filter(function (l) { return l.quantity > 0; }));
    return removed;
  }

  function clearCart() { saveCart([]); }

  /** Cart lines joined with the catalogue: [{product, quantity, total}]. */
  function cartLines() {
    return cart().map(function (l) {
      var p = product(l.productId);
      return { product: p, quantity: l.quantity, total: p.price * l.quantity };
    });
  }

  function cartCount() { return cart().reduce(function (n, l) { return n + l.quantity; }, 0); }
  function cartTotal() { return cartLines().reduce(function (n, l) { return n + l.total; }, 0); }
  function cartItems() { return cartLines().map(function (l) { return item(l.product, l.quantity); }); }

  function updateCartCount() {
    var el = document.getElementById('cart-count');
    if (!el) return;
    var n = cartCount();
    el.textContent = String(n);
    el.setAttribute('data-count', String(n));
    el.setAttribute('aria-label', n + (n === 1 ? ' item' : ' items') + ' in cart');
  }

  // ---------------------------------------------------------------- user (shop state)

  var USER_KEY = 'shop.user';

  function normalizeEmail(email) { return String(email || '').trim().toLowerCase(); }

  /**
   * The user id sent to the tracker for an email: "user-" + FNV-1a 64-bit hash (16 hex
   * digits) of the trimmed, lower-cased email. Stable, and keeps the raw address out of ids.
   */
  function userIdForEmail(email) {
    var bytes = new TextEncoder().encode(normalizeEmail(email));
    var h = BigInt('0xcbf29ce484222325');
    var prime = BigInt('0x100000001b3');
    var mask = BigInt('0xffffffffffffffff');
    for (var i = 0; i < bytes.length; i++) {
      h = ((h ^ BigInt(bytes[i])) * prime) & mask;
    }
    return 'user-' + h.toString(16).padStart(16, '0');
  }

  /** The logged-in shop user {email, firstName, userId}, or null. */
  function user() {
    var u = store.get(USER_KEY);
    return u && typeof u.email === 'string' && typeof u.userId === 'string' ? u : null;
  }

  function setUser(u) { if (u) store.set(USER_KEY, u); else store.remove(USER_KEY); renderHeader(); }

  // ---------------------------------------------------------------- header and footer

  function renderHeader() {
    var el = document.getElementById('site-header');
    if (!el) return;
    var page = document.body.getAttribute('data-page') || '';
    var current = page === 'category' ? param('c') : page === 'product' ? ((product(param('id')) || {}).category) : null;
    var u = user();
    var nav = CATEGORIES.map(function (c) {
      return '<a href="category.html?c=' + c.id + '" data-category="' + c.id + '"' +
        (c.id === current ? ' aria-current="page"' : '') + '>' + esc(c.name) + '</a>';
    }).join('');
    el.className = 'site-header';
    el.innerHTML = '<div class="container header__bar">' +
      '<a class="brand" href="index.html" data-testid="brand"><span class="brand__mark" aria-hidden="true"></span>' + SHOP_NAME + '</a>' +
      '<nav class="nav" aria-label="Categories">' + nav + '</nav>' +
      '<div class="header__actions">' +
      '<a href="inspector.html" id="nav-inspector" class="demo-link" title="Demo tool: watch your profile update live">' +
      '<span aria-hidden="true">◉</span><span class="label-wide">Profile inspector</span><span class="visually-hidden">Profile inspector</span></a>' +
      '<a href="account.html" id="nav-account"' + (page === 'account' ? ' aria-current="page"' : '') + '>' +
      '<span aria-hidden="true">☺</span><span id="header-user" class="label-wide">' +
      esc(u ? (u.firstName ? 'Hi, ' + u.firstName : 'Account') : 'Sign in') + '</span></a>' +
      '<a href="cart.html" id="nav-cart"' + (page === 'cart' ? ' aria-current="page"' : '') + '>Cart ' +
      '<span id="cart-count" class="cart-badge" data-testid="cart-count" aria-live="polite">0</span></a>' +
      '</div></div>';
    updateCartCount();
  }

  function renderFooter() {
    var el = document.getElementById('site-footer');
    if (!el) return;
    el.className = 'site-footer';
    el.innerHTML = '<div class="container">' +
      '<div class="footer__grid">' +
      '<div><h3>' + SHOP_NAME + '</h3><p>A demo shop for the real-time personalization pipeline. ' +
      'Nothing here is for sale and no payment is taken.</p></div>' +
      '<div><h3>Shop</h3><ul>' + CATEGORIES.map(function (c) {
        return '<li><a href="category.html?c=' + c.id + '">' + esc(c.name) + '</a></li>';
      }).join('') + '</ul></div>' +
      '<div><h3>Help</h3><ul>' +
      '<li><a href="account.html">Account &amp; newsletter</a></li>' +
      '<li><a href="cart.html">Cart</a></li>' +
      '<li><a href="inspector.html">Profile inspector</a></li>' +
      '<li><button type="button" class="linklike" id="privacy-settings" data-testid="privacy-settings">Privacy settings</button></li>' +
      '</ul></div></div>' +
      '<div class="footer__legal"><span>© ' + new Date().getFullYear() + ' ' + SHOP_NAME + ' (demo)</span>' +
      '<span>Prices include VAT. Currency: EUR.</span></div></div>';
    document.getElementById('privacy-settings').addEventListener('click', function () {
      if (window.ShopConsent) window.ShopConsent.open();
    });
  }

  // ---------------------------------------------------------------- toast

  var toastTimer = null;

  /** A short message at the bottom of the screen; `html` is trusted markup. */
  function toast(html) {
    var el = document.getElementById('toast');
    if (!el) {
      el = document.createElement('div');
      el.id = 'toast';
      el.className = 'toast';
      el.setAttribute('role', 'status');
      el.setAttribute('aria-live', 'polite');
      document.body.appendChild(el);
    }
    el.innerHTML = html;
    // Force a reflow so the transition runs when shown again.
    void el.offsetWidth;
    el.classList.add('is-visible');
    clearTimeout(toastTimer);
    toastTimer = setTimeout(function () { el.classList.remove('is-visible'); }, 3500);
  }

  // ---------------------------------------------------------------- boot

  renderHeader();
  renderFooter();

  // Keep the cart badge right across tabs and when a page comes back from the back/forward cache.
  window.addEventListener('storage', function (e) {
    if (e.key === CART_KEY) { updateCartCount(); document.dispatchEvent(new CustomEvent('shop:cart')); }
    if (e.key === USER_KEY) renderHeader();
  });
  window.addEventListener('pageshow', function (e) { if (e.persisted) { renderHeader(); document.dispatchEvent(new CustomEvent('shop:cart')); } });

  window.Shop = {
    CURRENCY: CURRENCY,
    NAME: SHOP_NAME,
    categories: CATEGORIES,
    products: PRODUCTS,
    product: product,
    category: category,
    productsIn: productsIn,
    featured: featured,
    esc: esc,
    money: money,
    param: param,
    pz: pz,
    store: store,
    image: image,
    productCard: productCard,
    item: item,
    cart: cart,
    cartAdd: cartAdd,
    cartRemove: cartRemove,
    clearCart: clearCart,
    cartLines: cartLines,
    cartCount: cartCount,
    cartTotal: cartTotal,
    cartItems: cartItems,
    user: user,
    setUser: setUser,
    normalizeEmail: normalizeEmail,
    userIdForEmail: userIdForEmail,
    toast: toast
  };
})();
