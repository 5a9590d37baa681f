// Draws every chart in new content (the page, then each htmx swap) with plotly.js, from the figure
// JSON the server put beside it; and keeps the filter bar's URLs short (no empty parameters).
(function () {
  "use strict";
  var config = {displaylogo: false, responsive: true, modeBarButtonsToRemove: ["lasso2d", "select2d"]};

  function draw(root) {
    var scope = root.querySelectorAll ? root : document;
    scope.querySelectorAll("[data-figure]").forEach(function (el) {
      var source = document.getElementById(el.getAttribute("data-figure"));
      if (!source || !window.Plotly) { return; }
      var figure = JSON.parse(source.textContent);
      window.Plotly.react(el, figure.data, figure.layout, config).then(function () {
        el.setAttribute("data-drawn", "true");
      });
    });
  }

  htmx.onLoad(draw);

  document.addEventListener("htmx:configRequest", function (event) {
    var params = event.detail.parameters;
    var custom = params.range === "custom";
    ["start", "end", "tenant", "feature", "model"].forEach(function (name) {
      if (params[name] === "" || (!custom && (name === "start" || name === "end"))) { delete params[name]; }
    });
  });

  // The custom dates only make sense with the custom range: show them when it is picked.
  document.addEventListener("change", function (event) {
    if (event.target && event.target.name === "range") {
      var custom = document.getElementById("custom-range");
      if (custom) { custom.hidden = event.target.value !== "custom"; }
    }
  });
})();
