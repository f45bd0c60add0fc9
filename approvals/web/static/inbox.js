// approvals — the reviewers' inbox. Plain JavaScript, no build step.
//
// Everything from the server is data: it is put into the page with textContent (and into href
// only as /inbox/approvals/<encoded id>), never as HTML. The pages work without this file; it adds
// live updates, ticking times and the keyboard shortcuts.
(function () {
  "use strict";

  var body = document.body;
  var page = body.getAttribute("data-page");

  // ---- times ----------------------------------------------------------------------------------

  function span(seconds) {
    seconds = Math.max(seconds, 0);
    var units = [["d", 86400], ["h", 3600], ["min", 60]];
    for (var i = 0; i < units.length; i++) {
      if (seconds >= units[i][1]) return Math.floor(seconds / units[i][1]) + " " + units[i][0];
    }
    return Math.floor(seconds) + " s";
  }

  function now() { return Date.now() / 1000; }

  function age(since) { return now() - since < 5 ? "just now" : span(now() - since) + " ago"; }

  function left(until) { return until - now() <= 0 ? "expiring" : span(until - now()) + " left"; }

  function tick(root) {
    (root || document).querySelectorAll("[data-since]").forEach(function (el) {
      var since = parseFloat(el.getAttribute("data-since"));
      if (since) el.textContent = age(since);
    });
    (root || document).querySelectorAll("[data-until]").forEach(function (el) {
      var until = parseFloat(el.getAttribute("data-until"));
      if (until) el.textContent = left(until);
    });
  }

  // ---- the live feed --------------------------------------------------------------------------

  function connect(onEvent) {
    var url = body.getAttribute("data-live");
    if (!url || !window.EventSource) return;
    var status = document.querySelector("[data-live-status]");
    var statusText = document.querySelector("[data-live-text]");
    function show(state, text) {
      if (!status) return;
      status.classList.remove("on", "off");
      status.classList.add(state);
      if (statusText) statusText.textContent = text;
    }
    var source = new EventSource(url);
    source.addEventListener("open", function () { show("on", "Live"); });
    source.addEventListener("error", function () { show("off", "Reconnecting…"); });
    ["snapshot", "created", "updated"].forEach(function (kind) {
      source.addEventListener(kind, function (event) {
        var data;
        try { data = JSON.parse(event.data); } catch (e) { return; }
        onEvent(kind, data);
      });
    });
  }

  function setText(root, field, value) {
    var el = root.querySelector('[data-field="' + field + '"]');
    if (el) el.textContent = value == null ? "" : String(value);
    return el;
  }

  // Set a field's text and hide it when there is none.
  function setShown(root, field, value) {
    var el = setText(root, field, value);
    if (el) el.hidden = !value;
  }

  // ---- the detail page (the pending list is pending.js's) ------------------------------------- ------------------------------------------------------------------------

  function detailPage() {
    var approveForm = document.querySelector("[data-approve-form]");
    var dialog = document.getElementById("confirm-approve");
    var reason = document.getElementById("reason");

    // Each event carries everything below (badge, decision, result, history): all of it is
    // updated from the same event, never one panel ahead of another. Older versions are ignored
    // (the snapshot may already be newer than an event queued before it).
    connect(function (kind, data) {
      var items = kind === "snapshot" ? data.items : [data];
      items.forEach(function (item) {
        var shown = parseInt(body.getAttribute("data-version") || "0", 10);
        if (item.version < shown) return;
        body.setAttribute("data-version", String(item.version));
        body.setAttribute("data-status", item.status);
        var badge = document.querySelector('.detail-head [data-field="status"]');
        if (badge) {
          badge.textContent = item.status;
          badge.className = "badge badge-" + item.status;
        }
        setText(document, "args-note", item.args_note);
        showResult(item.result);
        showTimeline(item.timeline);
        if (item.status === "pending") return;
        var decide = document.querySelector("[data-decide]");
        if (decide) decide.hidden = true;
        var own = document.querySelector("[data-own-agent]");
        if (own) own.hidden = true;
        var note = document.querySelector("[data-decided-note]");
        if (note) {
          note.hidden = false;
          setText(note, "decision", item.decision);
          setShown(note, "reason", item.reason);
          setText(note, "outcome", item.outcome);
        }
      });
    });

    function showResult(result) {
      var panel = document.querySelector("[data-result]");
      if (!panel || !result) return;
      panel.hidden = result.state === "none";
      setShown(panel, "result-note", result.note);
      setShown(panel, "result-text", result.text);
    }

    function showTimeline(events) {
      var list = document.querySelector("[data-timeline]");
      if (!list || !events) return;
      var entries = events.map(function (e) {
        var li = document.createElement("li");
        var name = document.createElement("span");
        name.className = "ev ev-" + e.event;
        name.textContent = e.event;
        li.appendChild(name);
        li.appendChild(document.createTextNode(" by " + e.actor));
        if (e.channel) {
          var via = document.createElement("span");
          via.className = "muted";
          via.textContent = "via " + e.channel;
          li.appendChild(document.createTextNode(" "));
          li.appendChild(via);
        }
        li.appendChild(document.createElement("br"));
        var at = document.createElement("time");
        at.className = "muted small";
        at.textContent = e.at;
        li.appendChild(at);
        if (e.detail) {
          var detail = document.createElement("span");
          detail.className = "small";
          detail.textContent = e.detail;
          li.appendChild(document.createElement("br"));
          li.appendChild(detail);
        }
        return li;
      });
      list.replaceChildren.apply(list, entries);
    }

    if (dialog) {
      dialog.querySelector("[data-confirm]").addEventListener("click", function () {
        dialog.close();
        if (approveForm) approveForm.requestSubmit();
      });
      dialog.querySelector("[data-cancel]").addEventListener("click", function () { dialog.close(); });
    }

    document.addEventListener("keydown", function (event) {
      if (event.ctrlKey || event.metaKey || event.altKey || event.defaultPrevented) return;
      var target = event.target;
      if (target && target.closest && target.closest("input, textarea, select, [contenteditable]")) return;
      if (dialog && dialog.open) return;
      if (body.getAttribute("data-status") !== "pending") return;
      if (event.key === "a" && approveForm && dialog) {
        event.preventDefault();
        dialog.showModal();
        dialog.querySelector("[data-confirm]").focus();
      } else if (event.key === "d" && reason) {
        event.preventDefault();
        reason.focus();
        reason.scrollIntoView({ block: "center" });
      }
    });
  }

  tick();
  window.setInterval(tick, 15000);
  if (page === "detail") detailPage();
})();
