// Portunus Web UI behaviour: progressive enhancement, loaded as a file (the CSP
// forbids inline script).  Three jobs:
//  1. POST forms go through fetch() with the X-Portunus-CSRF header (a plain
//     cross-site form post cannot set it, so the server refuses those);
//  2. copy buttons for secrets shown once;
//  3. the live chart of a rule (Server-Sent Events from /v1/rules/{id}/stats/stream).
(function () {
  "use strict";

  function swapDocument(html) {
    var doc = new DOMParser().parseFromString(html, "text/html");
    document.title = doc.title;
    document.body.replaceWith(document.adoptNode(doc.body));
    init();
    var focus = document.querySelector(".alert[tabindex], [autofocus]");
    if (focus) { focus.focus(); }
  }

  function showFailure(form, text) {
    var box = form.querySelector(".js-failure");
    if (!box) {
      box = document.createElement("div");
      box.className = "alert bad js-failure";
      box.setAttribute("role", "alert");
      form.prepend(box);
    }
    box.textContent = text;
  }

  async function onSubmit(ev) {
    var form = ev.target;
    if (!(form instanceof HTMLFormElement) || form.method.toLowerCase() !== "post") { return; }
    var question = form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) { ev.preventDefault(); return; }
    ev.preventDefault();
    var body = new URLSearchParams(new FormData(form, ev.submitter || undefined));
    var buttons = form.querySelectorAll("button");
    buttons.forEach(function (b) { b.disabled = true; });
    try {
      var resp = await fetch(form.action, {
        method: "POST", body: body, credentials: "same-origin", redirect: "follow",
        headers: { "X-Portunus-CSRF": "1", "Accept": "text/html" },
      });
      if (resp.redirected) { window.location.assign(resp.url); return; }
      var type = resp.headers.get("content-type") || "";
      if (type.indexOf("text/html") === 0) { swapDocument(await resp.text()); return; }
      showFailure(form, "The server answered " + resp.status + ": " + (await resp.text()).slice(0, 300));
    } catch (err) {
      showFailure(form, "Could not reach the server: " + err);
    } finally {
      buttons.forEach(function (b) { b.disabled = false; });
    }
  }

  async function onClick(ev) {
    var button = ev.target.closest("[data-copy]");
    if (!button) { return; }
    var source = document.getElementById(button.getAttribute("data-copy"));
    if (!source) { return; }
    var text = source.textContent.trim();
    try {
      await navigator.clipboard.writeText(text);
    } catch (err) {
      var range = document.createRange();
      range.selectNodeContents(source);
      var sel = window.getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      document.execCommand("copy");
    }
    button.textContent = "Copied";
    setTimeout(function () { button.textContent = "Copy"; }, 2000);
  }

  // ------------------------------------------------------------ live chart
  var UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];
  function human(n, suffix) {
    var i = 0;
    while (Math.abs(n) >= 1024 && i < UNITS.length - 1) { n /= 1024; i += 1; }
    return (i === 0 ? Math.round(n) : n.toFixed(1)) + " " + UNITS[i] + (suffix || "");
  }

  function drawLine(line, values, max, w, h) {
    var step = values.length > 1 ? w / (values.length - 1) : w;
    line.setAttribute("points", values.map(function (v, i) {
      return (i * step).toFixed(1) + "," + (h - (v / max) * (h - 8)).toFixed(1);
    }).join(" "));
  }

  var stream = null;
  function startLive() {
    if (stream) { stream.close(); stream = null; }
    var box = document.querySelector("[data-live]");
    if (!box || typeof EventSource === "undefined") { return; }
    var points = Number(box.getAttribute("data-points") || 120);
    var rin = [], rout = [], last = null;
    var field = function (name) { return box.querySelector('[data-field="' + name + '"]'); };
    var set = function (name, text) { var el = field(name); if (el) { el.textContent = text; } };
    stream = new EventSource(box.getAttribute("data-live"));
    stream.onmessage = function (ev) {
      var s = JSON.parse(ev.data);
      var now = Date.now() / 1000;
      if (last) {
        var dt = Math.max(now - last.t, 0.001);
        rin.push(Math.max(0, s.bytes_in - last.s.bytes_in) / dt);
        rout.push(Math.max(0, s.bytes_out - last.s.bytes_out) / dt);
        if (rin.length > points) { rin.shift(); rout.shift(); }
      }
      last = { s: s, t: now };
      set("bytes_in", human(s.bytes_in));
      set("bytes_out", human(s.bytes_out));
      set("connections_total", String(s.connections_total));
      set("active_connections", String(s.active_connections));
      set("rate_in", human(rin.length ? rin[rin.length - 1] : 0, "/s"));
      set("rate_out", human(rout.length ? rout[rout.length - 1] : 0, "/s"));
      box.setAttribute("data-updates", String(Number(box.getAttribute("data-updates") || 0) + 1));
      var svg = box.querySelector("svg");
      if (svg && rin.length) {
        var w = Number(svg.getAttribute("data-w")), h = Number(svg.getAttribute("data-h"));
        var max = Math.max(1, Math.max.apply(null, rin.concat(rout)));
        drawLine(svg.querySelector(".in"), rin, max, w, h);
        drawLine(svg.querySelector(".out"), rout, max, w, h);
        var top = box.querySelector(".axis-max");
        if (top) { top.textContent = human(max, "/s"); }
      }
    };
    stream.addEventListener("end", function () { stream.close(); set("status", "stream ended"); });
  }

  function init() { startLive(); }

  document.addEventListener("submit", onSubmit);
  document.addEventListener("click", onClick);
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
