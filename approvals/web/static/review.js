// approvals — the review panels of a request's page. Plain JavaScript, no build step; the page
// works without it (the server judges every form). It adds: the editor's JSON check as you type,
// only the inputs of the chosen widening in the remember form, the quorum progress kept current,
// and the review forms hidden once the request is decided.
(function () {
  "use strict";

  var body = document.body;

  // ---- the editor: is it a JSON object? ---------------------------------------------------------

  var editor = document.querySelector("[data-editor]");
  var status = document.querySelector("[data-edit-status]");
  if (editor && status) {
    var check = function () {
      var text = editor.value;
      var problem = "";
      try {
        var value = JSON.parse(text);
        if (value === null || typeof value !== "object" || Array.isArray(value)) {
          problem = "The arguments must be a JSON object ({…}).";
        }
      } catch (e) {
        problem = "Not JSON yet: " + e.message;
      }
      status.textContent = problem || "A JSON object: the gateway checks it against the schema when you approve.";
      status.classList.toggle("bad", !!problem);
      status.classList.toggle("ok", !problem);
      editor.classList.toggle("invalid", !!problem);
    };
    editor.addEventListener("input", check);
    check();
  }

  // ---- the remember form: show the inputs of the chosen widening --------------------------------

  document.querySelectorAll("[data-row]").forEach(function (row) {
    var select = row.querySelector("[data-op]");
    if (!select) return;
    var show = function () {
      row.querySelectorAll("[data-op-input]").forEach(function (input) {
        input.hidden = input.getAttribute("data-op-input") !== select.value;
      });
    };
    select.addEventListener("change", show);
    show();
  });

  // ---- the review as it moves ---------------------------------------------------------------------

  // inbox.js follows the live feed and keeps data-status / data-version on <body> current; the
  // progress line comes in the same events, so it is read from a feed of this file's own only
  // when the page shows one.
  var progress = document.querySelector("[data-progress]");
  var url = body.getAttribute("data-live");
  if (progress && url && window.EventSource) {
    var source = new EventSource(url);
    ["snapshot", "updated"].forEach(function (kind) {
      source.addEventListener(kind, function (event) {
        var data;
        try { data = JSON.parse(event.data); } catch (e) { return; }
        var items = kind === "snapshot" ? data.items : [data];
        items.forEach(function (item) {
          if (item && typeof item.progress === "string" && item.progress) progress.textContent = item.progress;
          if (item && item.status && item.status !== "pending") source.close();
        });
      });
    });
  }

  function hideForms() {
    if (body.getAttribute("data-status") === "pending") return;
    document.querySelectorAll("[data-review-form]").forEach(function (el) { el.hidden = true; });
  }
  if (window.MutationObserver) {
    new MutationObserver(hideForms).observe(body, { attributes: true, attributeFilter: ["data-status"] });
  }
})();
