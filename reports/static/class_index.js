// The report's only script (pinned by its hash in the Content-Security-Policy): search and page the
// index of every class, and show one class's top phrases. Data comes from the JSON block
// #class-data; everything is written with textContent, never parsed as HTML.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("class-data").textContent);
  var rows = data.classes, cols = data.columns, perPage = 50, page = 0, shown = rows;
  var body = document.getElementById("class-index-body");
  var search = document.getElementById("class-search");
  var info = document.getElementById("class-page");
  var panel = document.getElementById("class-detail");
  function cell(tr, text, cls) {
    var td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.appendChild(td);
  }
  function fmt(v, pct) {
    if (v === null || v === undefined) return "–";
    return pct ? (100 * v).toFixed(0) + "%" : v.toFixed(2);
  }
  function detail(r) {
    panel.replaceChildren();
    var h = document.createElement("h3");
    h.textContent = r.name + " (" + r.n + " images, " + r.flags + " flags)";
    panel.appendChild(h);
    var table = document.createElement("table");
    var head = document.createElement("tr");
    ["phrase", "dir.", "freq.", "elsewhere", "lift", "z_lift"].forEach(function (t) {
      var th = document.createElement("th");
      th.textContent = t;
      head.appendChild(th);
    });
    table.appendChild(head);
    r.tops.forEach(function (t) {
      var tr = document.createElement("tr");
      if (t[cols.flagged]) tr.className = "flagged";
      cell(tr, t[cols.phrase]);
      cell(tr, t[cols.direction]);
      cell(tr, fmt(t[cols.frequency], true), "n");
      cell(tr, fmt(t[cols.frequency_other], true), "n");
      cell(tr, fmt(t[cols.lift]), "n");
      cell(tr, fmt(t[cols.z_lift]), "n");
      table.appendChild(tr);
    });
    panel.appendChild(table);
    var q = document.createElement("p");
    q.className = "muted";
    q.textContent = "All phrases of this class: textcam sql RUN_DIR \"SELECT * FROM concept_stats WHERE class_name = '" +
      r.name.replace(/'/g, "''") + "' ORDER BY z_lift DESC\"";
    panel.appendChild(q);
  }
  function render() {
    body.replaceChildren();
    var start = page * perPage, end = Math.min(shown.length, start + perPage);
    shown.slice(start, end).forEach(function (r) {
      var tr = document.createElement("tr");
      var td = document.createElement("td");
      var b = document.createElement("button");
      b.type = "button";
      b.textContent = r.name;
      b.addEventListener("click", function () { detail(r); });
      td.appendChild(b);
      tr.appendChild(td);
      cell(tr, String(r.n), "n");
      cell(tr, String(r.flags), "n");
      cell(tr, r.top_for || "–");
      cell(tr, r.top_against || "–");
      body.appendChild(tr);
    });
    info.textContent = shown.length ? (start + 1) + "–" + end + " of " + shown.length + " classes" : "no class matches";
    document.getElementById("class-prev").disabled = page === 0;
    document.getElementById("class-next").disabled = end >= shown.length;
  }
  search.addEventListener("input", function () {
    var q = search.value.trim().toLowerCase();
    shown = q ? rows.filter(function (r) { return r.name.toLowerCase().indexOf(q) >= 0; }) : rows;
    page = 0;
    render();
  });
  document.getElementById("class-prev").addEventListener("click", function () { page -= 1; render(); });
  document.getElementById("class-next").addEventListener("click", function () { page += 1; render(); });
  document.getElementById("class-index").hidden = false;
  render();
})();
