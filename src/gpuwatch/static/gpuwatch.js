// gpuwatch fleet page: fetch the server-rendered fleet part after every poll and swap it in, count
// the age of the data, keep the filter, the sort and the view in the URL. It never builds HTML from data: the server
// escapes everything (Jinja2 autoescape) and this script only moves its output into the page.
(function () {
  "use strict";
  var body = document.body;
  var base = body.getAttribute("data-base") || "";
  var refresh = parseInt(body.getAttribute("data-refresh-ms"), 10) || 5000;
  var fleet = document.getElementById("fleet");
  var form = document.getElementById("filter");
  var q = document.getElementById("q");
  var free = document.getElementById("free");
  var sort = document.getElementById("sort");
  var view = document.getElementById("view");
  var viewlink = document.getElementById("viewlink");
  var conn = document.getElementById("conn");
  var etag = null;
  var offset = 0; // server clock minus this browser's clock, in seconds
  var lastAnswer = Date.now();
  var timer = null;
  var debounce = null;
  var seq = 0;

  // Mirrors gpuwatch.text.format_duration: 42s, 1m30s, 3d2h (the two largest units).
  function duration(seconds) {
    var total = Math.max(0, Math.round(seconds));
    if (total < 60) return total + "s";
    var parts = [];
    [["d", 86400], ["h", 3600], ["m", 60], ["s", 1]].forEach(function (unit) {
      var n = Math.floor(total / unit[1]);
      total -= n * unit[1];
      if (n) parts.push(n + unit[0]);
    });
    return parts.slice(0, 2).join("");
  }

  function query() {
    var params = new URLSearchParams();
    var text = q.value.trim();
    if (text) params.set("q", text);
    if (free.checked) params.set("free", "1");
    if (sort && sort.value) params.set("sort", sort.value);
    if (view && view.value) params.set("view", view.value);
    var s = params.toString();
    return s ? "?" + s : "";
  }

  // The link to the other view (list or wall) keeps the filter and the sort.
  function otherView() {
    var params = new URLSearchParams(query().slice(1));
    params.set("view", body.classList.contains("view-wall") ? "list" : "wall");
    return location.pathname + "?" + params.toString();
  }

  function syncClock() {
    var data = document.getElementById("data");
    var now = data && parseFloat(data.getAttribute("data-now"));
    if (now) offset = now - Date.now() / 1000;
  }

  function tick() {
    var now = Date.now() / 1000 + offset;
    var times = fleet.querySelectorAll("time.ago[data-ts]");
    for (var i = 0; i < times.length; i++) {
      var ts = parseFloat(times[i].getAttribute("data-ts"));
      if (ts) times[i].textContent = duration(now - ts) + " ago";
    }
    var silent = (Date.now() - lastAnswer) / 1000;
    if (silent > Math.max(3 * refresh / 1000, 15)) {
      conn.textContent = "gpuwatch has not answered for " + duration(silent) +
        ": what this page shows may be out of date.";
      conn.hidden = false;
    }
  }

  function swap(html) {
    var open = {};
    var details = fleet.querySelectorAll("details[open]");
    for (var i = 0; i < details.length; i++) open[details[i].getAttribute("data-key")] = true;
    fleet.innerHTML = html;
    details = fleet.querySelectorAll("details[data-key]");
    for (i = 0; i < details.length; i++) {
      if (open[details[i].getAttribute("data-key")]) details[i].open = true;
    }
    syncClock();
    tick();
  }

  function load() {
    clearTimeout(timer);
    var mine = ++seq;
    var headers = etag ? { "If-None-Match": etag } : {};
    fetch(base + "/fragment" + query(), { headers: headers, cache: "no-store", credentials: "same-origin" })
      .then(function (response) {
        if (response.status === 304) return null;
        if (!response.ok) throw new Error("HTTP " + response.status);
        var tag = response.headers.get("ETag");
        return response.text().then(function (html) { return { tag: tag, html: html }; });
      })
      .then(function (result) {
        if (mine !== seq) return; // a newer request (another filter) is on its way
        lastAnswer = Date.now();
        conn.hidden = true;
        if (result) {
          etag = result.tag;
          swap(result.html);
        }
      })
      .catch(function () { tick(); })
      .then(function () { if (mine === seq) timer = setTimeout(load, refresh); });
  }

  function filterChanged() {
    clearTimeout(debounce);
    debounce = setTimeout(function () {
      history.replaceState(null, "", location.pathname + query());
      if (viewlink) viewlink.href = otherView();
      etag = null;
      load();
    }, 200);
  }

  q.addEventListener("input", filterChanged);
  free.addEventListener("change", filterChanged);
  if (sort) sort.addEventListener("change", filterChanged);
  form.addEventListener("submit", function (event) { event.preventDefault(); filterChanged(); });
  document.addEventListener("visibilitychange", function () { if (!document.hidden) load(); });
  syncClock();
  tick();
  setInterval(tick, 1000);
  timer = setTimeout(load, refresh);
})();
