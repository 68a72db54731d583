// adapterhub pages: small progressive enhancements; every page reads and works without this script.
"use strict";
(function () {
  // Filters: a changed select applies the form at once.
  for (const el of document.querySelectorAll("select[data-autosubmit]")) {
    el.addEventListener("change", function () {
      const form = el.form;
      const page = form.querySelector("input[name=page]");
      if (page) page.remove();
      form.requestSubmit();
    });
  }

  // Search: typing narrows the rows already on this page at once; Enter asks the server.
  const search = document.querySelector("form.filters input[name=q]");
  const table = document.getElementById("adapters");
  if (search && table) {
    const rows = Array.from(table.tBodies[0].rows);
    const initial = search.value.trim().toLowerCase();
    let timer = 0;
    search.addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(function () {
        const words = search.value.trim().toLowerCase().split(/\s+/).filter(Boolean);
        if (search.value.trim().toLowerCase().startsWith(initial)) {
          for (const row of rows) {
            const text = row.dataset.text || "";
            row.classList.toggle("dim", !words.every(function (w) { return text.includes(w); }));
          }
        }
      }, 80);
    });
  }

  // Spectrum plot: highlight one module's curve (from the select, or by hovering its table row).
  const pick = document.getElementById("highlight");
  if (pick) {
    const plot = document.getElementById(pick.dataset.plot);
    const label = document.getElementById("hl-label");
    if (label) label.hidden = false;
    const curves = plot ? Array.from(plot.querySelectorAll(".curve")) : [];
    const spectraRows = Array.from(document.querySelectorAll("table.spectra tbody tr"));
    const show = function (value) {
      for (const c of curves) c.classList.toggle("hi", c.dataset.module === value);
      spectraRows.forEach(function (r, i) { r.classList.toggle("hi", String(i) === value); });
      if (plot) plot.classList.toggle("has-hi", value !== "");
    };
    pick.addEventListener("change", function () { show(pick.value); });
    spectraRows.forEach(function (r, i) {
      r.addEventListener("mouseenter", function () { show(String(i)); });
      r.addEventListener("mouseleave", function () { show(pick.value); });
    });
  }

  // Snippets: a copy button beside each one.
  if (navigator.clipboard) {
    for (const fig of document.querySelectorAll("figure.snippet")) {
      const code = fig.querySelector("code");
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = "Copy";
      button.setAttribute("aria-label", "Copy the " + fig.querySelector("figcaption").textContent + " snippet");
      button.addEventListener("click", function () {
        navigator.clipboard.writeText(code.textContent).then(
          function () { button.textContent = "Copied"; },
          function () { button.textContent = "Copy failed"; }
        );
      });
      fig.querySelector("figcaption").appendChild(button);
    }
  }
})();
