// Image viewer: scroll slices, switch window presets, toggle the saliency overlay.
// Slices are PNGs rendered by the server; this script only swaps their URLs.
(function () {
  "use strict";
  var viewer = document.getElementById("viewer");
  if (!viewer) { return; }
  var base = viewer.dataset.base;
  var series = viewer.dataset.series;
  var n = parseInt(viewer.dataset.slices, 10);
  var m = parseInt(viewer.dataset.modelSlices || "0", 10);
  var slider = document.getElementById("slice");
  var pos = document.getElementById("slice-pos");
  var anatomy = document.getElementById("anatomy");
  var modelImg = document.getElementById("model-input");
  var overlay = document.getElementById("saliency");
  var toggle = document.getElementById("overlay");
  var windowNames = {soft: "soft tissue", lung: "lung", bone: "bone", brain: "brain", full: "full range"};

  function currentWindow() {
    var checked = viewer.querySelector("input[name=window]:checked");
    return checked ? checked.value : "soft";
  }
  // Stored slices and model-input slices differ in number: map by relative position.
  function modelIndex(k) {
    if (m <= 1 || n <= 1) { return 0; }
    return Math.round(k * (m - 1) / (n - 1));
  }
  function show(k) {
    k = Math.max(0, Math.min(n - 1, k));
    slider.value = String(k + 1);
    var w = currentWindow();
    anatomy.src = base + "/series/" + series + "/slices/" + k + ".png?window=" + w;
    anatomy.alt = "CT slice " + (k + 1) + " of " + n + ", " + windowNames[w] + " window";
    pos.textContent = "Slice " + (k + 1) + " of " + n;
    if (modelImg) {
      var j = modelIndex(k);
      modelImg.src = base + "/model-input/" + j + ".png";
      modelImg.alt = "Model-input view of slice " + (j + 1) + " of " + m +
        " (resampled and windowed as the model saw it)";
      overlay.src = base + "/saliency/" + j + ".png";
      overlay.alt = "Saliency overlay for slice " + (j + 1) + " of " + m +
        ": warm colours mark regions that raised the predicted risk (covering them lowered it)";
      viewer.dataset.modelSlice = String(j);
    }
    viewer.dataset.slice = String(k);
  }
  function current() { return parseInt(slider.value, 10) - 1; }

  slider.addEventListener("input", function () { show(current()); });
  viewer.querySelectorAll("button.step").forEach(function (b) {
    b.addEventListener("click", function () { show(current() + parseInt(b.dataset.step, 10)); });
  });
  viewer.querySelectorAll("input[name=window]").forEach(function (r) {
    r.addEventListener("change", function () { show(current()); });
  });
  viewer.querySelectorAll("button[data-model-slice]").forEach(function (b) {
    b.addEventListener("click", function () {
      var j = parseInt(b.dataset.modelSlice, 10);
      show(m > 1 ? Math.round(j * (n - 1) / (m - 1)) : 0);
    });
  });
  if (toggle) {
    var apply = function () { overlay.hidden = !toggle.checked; };
    toggle.addEventListener("change", apply);
    apply();
  }
  // Mouse wheel and PageUp/PageDown scroll slices, as in a PACS viewer.
  viewer.querySelector(".views").addEventListener("wheel", function (e) {
    e.preventDefault();
    show(current() + (e.deltaY > 0 ? 1 : -1));
  }, {passive: false});
  viewer.addEventListener("keydown", function (e) {
    if (e.key === "PageDown") { show(current() + 1); e.preventDefault(); }
    if (e.key === "PageUp") { show(current() - 1); e.preventDefault(); }
  });
  show(current());
}());
