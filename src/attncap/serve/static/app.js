// attncap web page: upload a picture, show the caption, its beam alternatives, and the attention
// map of every word drawn on a canvas over the picture (hover a word, or play them in order).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, result: null, word: 0, timer: null, url: null };
const PLAY_MS = 700;

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function loadModelInfo() {
  try {
    const health = await (await fetch("/health")).json();
    const m = health.model;
    $("model").textContent = `model: ${m.encoder} ${m.grid}x${m.grid} regions, ${m.decoder} ` +
      `${m.hidden_dim}, ${m.vocab_size} words`;
    $("beam").value = m.beam_size;
    $("nbest").value = Math.min(3, m.beam_size);
  } catch (err) {
    setStatus("the server does not answer /health", true);
  }
}

function chooseFile(file) {
  if (!file) return;
  state.file = file;
  $("again").disabled = false;
  if (state.url) URL.revokeObjectURL(state.url);
  state.url = URL.createObjectURL(file);
  captionFile();
}

async function captionFile() {
  stopPlaying();
  const form = new FormData();
  form.append("image", state.file, state.file.name);
  const query = new URLSearchParams({ beam_size: $("beam").value, n_best: $("nbest").value });
  setStatus(`captioning ${state.file.name}…`);
  $("result").dataset.state = "busy";
  let body;
  try {
    const response = await fetch(`/caption?${query}`, { method: "POST", body: form });
    body = await response.json();
    if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  } catch (err) {
    $("result").dataset.state = "error";
    setStatus(err.message, true);
    return;
  }
  state.result = body;
  await showPicture();
  render(body);
  setStatus("");
  $("result").dataset.state = "ready";
}

function showPicture() {
  return new Promise((resolve) => {
    const img = $("photo");
    img.onload = () => resolve();
    img.onerror = () => resolve();  // the server decoded it; a browser may not (e.g. TIFF)
    $("result").hidden = false;
    img.src = state.url;
  });
}

function render(result) {
  const caption = $("caption");
  caption.replaceChildren();
  result.words.forEach((word, i) => {
    const span = document.createElement("span");
    span.className = "word";
    span.textContent = word;
    span.dataset.index = i;
    span.addEventListener("mouseenter", () => { stopPlaying(); showWord(i); });
    caption.append(span, " ");
  });
  if (!result.words.length) caption.textContent = "(empty caption)";
  const list = $("alternatives");
  list.replaceChildren(...result.n_best.map((alt) => {
    const li = document.createElement("li");
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = alt.score.toFixed(2);
    li.append(alt.caption || "(empty)", score);
    return li;
  }));
  const t = result.timings;
  $("timings").textContent = `${result.image.width}x${result.image.height} px · model ` +
    `${t.model_ms.toFixed(0)} ms (batch of ${t.batch_size}) · total ${t.total_ms.toFixed(0)} ms`;
  showWord(0);
}

function showWord(i) {
  const words = state.result ? state.result.words : [];
  if (!words.length) { clearOverlay(); return; }
  state.word = i;
  document.querySelectorAll("#caption .word").forEach((el, k) => el.classList.toggle("active", k === i));
  $("current").textContent = `word ${i + 1} of ${words.length}: “${words[i]}”`;
  drawAttention(state.result.attention[i]);
}

function clearOverlay() {
  const canvas = $("overlay");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
}

// One grid cell per pixel of a small canvas (dark where the model did not look, a light warm tint
// where it did), then scaled up over the picture with smoothing.
function drawAttention(grid) {
  const canvas = $("overlay");
  const img = $("photo");
  const scale = window.devicePixelRatio || 1;
  canvas.width = Math.max(1, Math.round(img.clientWidth * scale));
  canvas.height = Math.max(1, Math.round(img.clientHeight * scale));
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!$("show").checked) return;
  const rows = grid.length, cols = grid[0].length;
  const peak = Math.max(...grid.flat(), 1e-12);
  const cells = document.createElement("canvas");
  cells.width = cols;
  cells.height = rows;
  const cctx = cells.getContext("2d");
  const pixels = cctx.createImageData(cols, rows);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const a = grid[r][c] / peak;   // 0..1
      const o = 4 * (r * cols + c);
      pixels.data[o] = 255 * a;
      pixels.data[o + 1] = 214 * a;
      pixels.data[o + 2] = 10 * a;
      pixels.data[o + 3] = 255 * (0.75 * (1 - a) + 0.22 * a);
    }
  }
  cctx.putImageData(pixels, 0, 0);
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(cells, 0, 0, canvas.width, canvas.height);
}

function stopPlaying() {
  if (state.timer) clearInterval(state.timer);
  state.timer = null;
  $("play").innerHTML = "&#9654; play";
}

function togglePlay() {
  if (state.timer) { stopPlaying(); return; }
  const words = state.result ? state.result.words : [];
  if (!words.length) return;
  let i = 0;
  showWord(i);
  $("play").innerHTML = "&#10074;&#10074; pause";
  state.timer = setInterval(() => {
    i = (i + 1) % words.length;
    showWord(i);
  }, PLAY_MS);
}

function wireDropZone() {
  const drop = $("drop");
  $("pick").addEventListener("click", () => $("file").click());
  $("file").addEventListener("change", (e) => chooseFile(e.target.files[0]));
  ["dragenter", "dragover"].forEach((type) => drop.addEventListener(type, (e) => {
    e.preventDefault();
    drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((type) => drop.addEventListener(type, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    chooseFile(e.dataTransfer.files[0]);
  });
}

window.addEventListener("DOMContentLoaded", () => {
  wireDropZone();
  $("again").addEventListener("click", () => state.file && captionFile());
  $("play").addEventListener("click", togglePlay);
  $("show").addEventListener("change", () => showWord(state.word));
  window.addEventListener("resize", () => state.result && showWord(state.word));
  loadModelInfo();
});
