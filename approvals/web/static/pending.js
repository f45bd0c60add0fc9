// approvals — the pending list: live rows with their review at a glance, and batch selection.
// Plain JavaScript, no build step.
//
// Everything from the server is data: it is put into the page with textContent (and into href
// only as /inbox/approvals/<encoded id>), never as HTML. The page works without this file (the
// batch form posts the ticked boxes, and the server checks everything again); it adds the live
// list, "Select all shown", the count of what is selected and the checks before posting.
// (inbox.js still ticks the relative times, page-wide.)
(function () {
  "use strict";

  var body = document.body;
  var list = document.querySelector("[data-rows]");
  var template = document.getElementById("row-template");
  var form = document.querySelector("[data-batch]");
  if (!list || !template || !form) return;

  var empty = document.querySelector("[data-empty]");
  var countText = document.querySelector("[data-count-text]");
  var log = document.querySelector("[data-live-log]");
  var pickAll = form.querySelector("[data-pick-all]");
  var pickAllLabel = form.querySelector("[data-pick-all-label]");
  var picked = form.querySelector("[data-picked]");
  var reason = form.querySelector("#batch-reason");
  var error = form.querySelector("[data-batch-error]");
  var hint = picked ? picked.textContent : "";
  var most = parseInt(form.getAttribute("data-max") || "200", 10);
  var count = parseInt(body.getAttribute("data-count") || "0", 10);

  function rows() { return Array.prototype.slice.call(list.querySelectorAll(".item")); }

  function find(id) {
    return rows().filter(function (row) { return row.getAttribute("data-id") === id; })[0] || null;
  }

  function box(row) { return row.querySelector("[data-pick]"); }

  function setText(root, field, value) {
    var el = root.querySelector('[data-field="' + field + '"]');
    if (el) el.textContent = value == null ? "" : String(value);
    return el;
  }

  // A flag's text, hidden when there is none.
  function setFlag(root, field, value) {
    var el = setText(root, field, value);
    if (el) el.hidden = !value;
    return el;
  }

  // ---- selection -----------------------------------------------------------------------------

  function selectable() { return rows().map(box).filter(function (b) { return b && !b.disabled; }); }

  function selected() { return selectable().filter(function (b) { return b.checked; }); }

  function showSelection() {
    var all = selectable();
    var on = selected();
    rows().forEach(function (row) {
      var b = box(row);
      row.classList.toggle("picked", !!(b && b.checked && !b.disabled));
    });
    if (pickAll) {
      pickAll.checked = all.length > 0 && on.length === all.length;
      pickAll.indeterminate = on.length > 0 && on.length < all.length;
      pickAll.disabled = all.length === 0;
    }
    if (picked) picked.textContent = on.length ? on.length + " selected" : hint;
  }

  function showError(text) {
    if (!error) return;
    error.textContent = text;
    error.hidden = !text;
  }

  if (pickAllLabel) pickAllLabel.hidden = false;  // needs this script, so shown by it
  if (pickAll) {
    pickAll.addEventListener("change", function () {
      selectable().forEach(function (b) { b.checked = pickAll.checked; });
      showError("");
      showSelection();
    });
  }
  list.addEventListener("change", function () { showError(""); showSelection(); });

  // The server refuses these too (400); saying so here keeps the selection and the typed reason.
  form.addEventListener("submit", function (event) {
    var submitter = event.submitter;
    var action = submitter ? submitter.value : "";
    var n = selected().length;
    var problem = "";
    if (n === 0) problem = "Select at least one request.";
    else if (n > most) problem = "At most " + most + " requests can be decided in one batch; " + n + " are selected.";
    else if (action === "deny" && reason && !reason.value.trim()) problem = "Say why you deny them: each agent is told the reason.";
    if (problem) {
      event.preventDefault();
      showError(problem);
      if (action === "deny" && n > 0 && reason) reason.focus();
    }
  });

  // ---- the live list -------------------------------------------------------------------------

  function render() {
    var text = count > 500 ? "500+" : String(count);
    document.title = "(" + text + ") approvals";
    if (countText) countText.textContent = text;
    if (empty) empty.hidden = rows().length > 0;
    showSelection();
  }

  function fill(row, item) {
    row.setAttribute("data-id", item.id);
    row.setAttribute("data-version", String(item.version));
    row.setAttribute("data-created", String(item.created_at));
    row.querySelector('[data-field="link"]').setAttribute("href", "/inbox/approvals/" + encodeURIComponent(item.id));
    ["tool", "upstream", "summary", "agent"].forEach(function (f) { setText(row, f, item[f]); });
    setText(row, "owner", item.owner || "—");
    setText(row, "pick-text", "Select " + item.tool + " from " + item.agent);
    var ageEl = setText(row, "age", item.age);
    ageEl.setAttribute("data-since", String(item.created_at));
    ageEl.setAttribute("title", item.created_iso);
    var leftEl = setText(row, "left", item.left);
    leftEl.setAttribute("data-until", String(item.expires_at));
    leftEl.setAttribute("title", "expires " + item.expires_iso);
    setFlag(row, "progress", item.progress);
    setFlag(row, "escalated", item.escalated);
    var readOnly = setFlag(row, "read-only", item.read_only ? "read-only: " + item.read_only : "");
    if (readOnly) readOnly.setAttribute("title", item.read_only || "");
    var b = box(row);
    b.value = item.id;
    b.disabled = !!item.read_only;
    if (item.read_only) {
      b.checked = false;  // e.g. this reviewer's vote was just counted: nothing more to do here
      b.setAttribute("title", item.read_only);
    } else {
      b.removeAttribute("title");
    }
  }

  function upsert(item, quiet) {
    var row = find(item.id);
    if (row) {
      if (parseInt(row.getAttribute("data-version"), 10) > item.version) return;
      fill(row, item);
      return;
    }
    row = template.content.firstElementChild.cloneNode(true);
    fill(row, item);
    var before = rows().filter(function (r) {
      return parseFloat(r.getAttribute("data-created")) < item.created_at;
    })[0] || null;
    list.insertBefore(row, before);
    count += 1;
    if (!quiet) {
      row.classList.add("fresh");
      if (log) log.textContent = "New request: " + item.tool + " from " + item.agent;
    }
  }

  function remove(item) {
    var row = find(item.id);
    if (!row) return;
    if (parseInt(row.getAttribute("data-version"), 10) > item.version) return;
    row.remove();  // a ticked box goes with it: a decided request is never in the batch
    count = Math.max(count - 1, 0);
    if (log) {
      log.textContent = item.tool + " from " + item.agent + " is " + item.status +
        (item.decided_by ? " (" + item.decided_by + ")" : "");
    }
  }

  function connect() {
    var url = body.getAttribute("data-list-live");
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
        if (kind === "snapshot") {
          var keep = {};
          data.items.forEach(function (item) { keep[item.id] = true; upsert(item, true); });
          rows().forEach(function (row) { if (!keep[row.getAttribute("data-id")]) row.remove(); });
          count = data.count;
        } else if (data.status === "pending") {
          upsert(data, false);
        } else {
          remove(data);
        }
        render();
      });
    });
  }

  showSelection();
  connect();
})();
