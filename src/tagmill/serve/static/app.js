/* tagmill web page: pick or drop an image, POST it to /predict, show the answer.
 *
 * API (same origin):
 *   GET  /api/model            -> {name, architecture, task, classes, thresholds, default_top_k,
 *                                  metrics, input_size, examples}
 *   POST /predict?top_k=&threshold=  (multipart field "file")
 *                              -> {labels, scores, top, task}  or  {error: {type, message}}
 *   GET  /examples/{name}      -> example images of this server
 *   POST /predict?explain=true (same query)  -> the answer plus
 *                                 explanations: [{label, score, overlay_png (base64), width, height}]
 *
 * No framework, no external resources: the page works offline. Server strings are
 * always inserted as text, never as HTML.
 */
(() => {
  "use strict";

  const NOT_READY_RETRIES = 30; // 503 while the model loads: ask again, up to this often
  const BELOW_DEFAULT = 3; // multi-label: how many tags under their threshold to list
  const CLASS_CHIPS = 24; // class names shown before "show all"
  // "why?" asks again on 503 (every explanation slot busy) this often: a few seconds of
  // patience, then the reason is shown; the answer itself is already on the page
  const EXPLAIN_RETRIES = 5;

  const $ = (id) => document.getElementById(id);
  const els = {
    topbarModel: $("topbar-model"),
    fileInput: $("file-input"),
    dropzone: $("dropzone"),
    dropEmpty: $("dropzone-empty"),
    preview: $("preview"),
    previewImg: $("preview-img"),
    previewCaption: $("preview-caption"),
    examples: $("examples"),
    exampleList: $("example-list"),
    urlForm: $("url-form"),
    urlInput: $("url-input"),
    originLabel: $("origin-label"),
    topkField: $("topk-field"),
    topkInput: $("topk-input"),
    topkLabel: document.querySelector("label[for='topk-input']"),
    thresholdField: $("threshold-field"),
    thresholdCustom: $("threshold-custom"),
    thresholdInput: $("threshold-input"),
    thresholdOutput: $("threshold-output"),
    status: $("status"),
    error: $("error"),
    errorTitle: $("error-title"),
    errorMessage: $("error-message"),
    result: $("result"),
    modelBody: $("model-body"),
    apikeyField: $("apikey-field"),
    apikeyInput: $("apikey-input"),
    why: $("why"),
    whyToggle: $("why-toggle"),
    whyClasses: $("why-classes"),
    whyStatus: $("why-status"),
    whyOverlay: $("why-overlay"),
  };

  const state = {
    model: null, // the /api/model answer
    image: null, // {blob, name} of the image being classified
    answer: null, // the last /predict answer
    seq: 0, // guards against a slow answer overwriting a newer one
    previewUrl: null,
    why: false, // the "why?" toggle is on
    explanations: null, // the explanations of the current answer, once fetched
    shownLabel: null, // the class whose heatmap is over the picture
  };

  // ---------------------------------------------------------------- helpers

  /** h("div", {class: "x"}, child, "text") -> element; strings become text nodes. */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") el.className = value;
      else if (key === "text") el.textContent = value;
      else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else el.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  function pct(p) {
    if (typeof p !== "number" || !Number.isFinite(p)) return "–";
    const v = Math.min(Math.max(p, 0), 1) * 100;
    if (v > 0 && v < 0.1) return "<0.1%";
    if (v > 99.9 && v < 100) return ">99.9%";
    if (v < 10 || (v > 99 && v < 100)) return `${v.toFixed(1)}%`;
    return `${Math.round(v)}%`;
  }

  function humanBytes(n) {
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(n < 10240 ? 1 : 0)} KB`;
    return `${(n / 1024 / 1024).toFixed(1)} MB`;
  }

  /** Class names as people read them: "science_fiction" -> "science fiction". */
  function readable(name) {
    return String(name).replace(/[_]+/g, " ");
  }

  const METRIC_WORDS = {
    f1: "F1", auc: "AUC", roc: "ROC", pr: "PR", map: "mAP", ece: "ECE", mcc: "MCC",
    acc: "accuracy", val: "val", top1: "top-1", top5: "top-5",
  };

  function metricName(key) {
    const words = String(key).split(/[_\s]+/).filter(Boolean).map((w) => {
      const lower = w.toLowerCase();
      if (METRIC_WORDS[lower]) return METRIC_WORDS[lower];
      const top = /^top(\d+)$/.exec(lower);
      return top ? `top-${top[1]}` : lower;
    });
    const text = words.join(" ");
    return /^[a-z]{2}/.test(text) ? text.charAt(0).toUpperCase() + text.slice(1) : text;
  }

  function metricValue(key, value) {
    if (value === null || value === undefined) return "–";
    if (typeof value !== "number") return String(value);
    if (/loss|count|epoch|n_|num/i.test(key) || value < 0 || value > 1) {
      return Number.isInteger(value) ? value.toLocaleString() : value.toFixed(3);
    }
    return `${(value * 100).toFixed(1)}%`;
  }

  /** The error of a response: the contract's {error: {type, message}}, FastAPI's
   *  {detail}, or just the status line. */
  async function responseError(res) {
    let body = null;
    try {
      body = await res.clone().json();
    } catch {
      body = null;
    }
    let type = "";
    let message = "";
    let hint = "";
    if (body && body.error) {
      type = body.error.type || "";
      message = body.error.message || "";
      hint = body.error.hint || "";
    } else if (body && body.detail) {
      message = Array.isArray(body.detail)
        ? body.detail.map((d) => d.msg || JSON.stringify(d)).join("; ")
        : String(body.detail);
    }
    if (!message) message = res.statusText || "The server gave no reason.";
    return { status: res.status, type, message, hint };
  }

  function errorTitle(status, type) {
    if (status === 400) return "The server refused the request";
    if (status === 401) return "This server needs an API key";
    if (status === 413) return "That file is too large";
    if (status === 415) return "That file type isn't supported";
    if (status === 422) return "That image couldn't be read";
    if (status === 429) return "Too many requests — try again in a moment";
    if (status === 503) return "The model isn't ready yet";
    if (status >= 500) return "The server ran into a problem";
    if (status === 404) return "Not found";
    if (type) return metricName(type);
    return "Something went wrong";
  }

  // ---------------------------------------------------------------- status / errors

  function setBusy(text) {
    els.result.setAttribute("aria-busy", "true");
    els.result.classList.add("is-busy");
    els.status.replaceChildren(h("span", { class: "spinner", "aria-hidden": "true" }), text);
  }

  function setIdle(text) {
    els.result.removeAttribute("aria-busy");
    els.result.classList.remove("is-busy");
    els.status.replaceChildren(text || "");
  }

  function showError(title, message, detail, hint) {
    setIdle("");
    els.errorTitle.textContent = title;
    els.errorMessage.replaceChildren(message);
    if (hint) els.errorMessage.append(h("span", { class: "error-hint" }, hint));
    if (detail) els.errorMessage.append(h("span", { class: "error-detail" }, detail));
    els.error.hidden = false;
  }

  function clearError() {
    els.error.hidden = true;
    els.errorTitle.textContent = "";
    els.errorMessage.textContent = "";
  }

  // ---------------------------------------------------------------- model card

  async function loadModel() {
    let res;
    try {
      res = await fetch("/api/model", { headers: { Accept: "application/json" } });
    } catch {
      return modelUnavailable("The server could not be reached.");
    }
    if (!res.ok) {
      const err = await responseError(res);
      return modelUnavailable(`${err.message} (HTTP ${err.status})`);
    }
    try {
      state.model = await res.json();
    } catch {
      return modelUnavailable("The server's model description was not JSON.");
    }
    renderModel(state.model);
    if (state.model.api_key_required) els.apikeyField.hidden = false;
    renderExamples(state.model.examples || []);
    configureSettings(state.model);
  }

  function modelUnavailable(reason) {
    els.topbarModel.textContent = "Model unavailable";
    els.modelBody.replaceChildren(
      h("p", { class: "placeholder" }, "The model description could not be loaded: ", reason),
    );
  }

  function isBinary(model) {
    return model && model.task === "single" && (model.classes || []).length === 2;
  }

  function taskLabel(model) {
    if (model.task === "multi") return "Multi-label tags";
    return isBinary(model) ? "Yes / no (binary)" : "Single label";
  }

  function renderModel(m) {
    const classes = m.classes || [];
    els.topbarModel.replaceChildren(
      h("span", { class: "topbar-name" }, m.name || "model"),
      h("span", { class: "topbar-arch" }, m.architecture || ""),
    );
    document.title = `${m.name || "model"} · tagmill`;

    const chips = (list) =>
      h("ul", { class: "chips", "aria-label": "Classes" },
        list.map((c, i) =>
          h("li", {
            class: `chip${isBinary(m) && i === 1 ? " chip-positive" : ""}`,
            title: isBinary(m) && i === 1 ? "the class the question asks about" : null,
          }, c)));

    const classBlock = classes.length > CLASS_CHIPS
      ? h("div", {},
          chips(classes.slice(0, CLASS_CHIPS)),
          h("details", { class: "more" },
            h("summary", {}, `Show all ${classes.length} classes`),
            chips(classes.slice(CLASS_CHIPS))))
      : chips(classes);

    const metrics = m.metrics || {};
    const split = metrics.split || "val";
    const metricKeys = Object.keys(metrics).filter((k) => k !== "split");
    const metricBlock = metricKeys.length
      ? h("dl", { class: "metrics" },
          metricKeys.map((k) =>
            h("div", { class: "metric" },
              h("dt", {}, metricName(k)),
              h("dd", { title: metrics[k] === null ? "not measured" : String(metrics[k]) },
                metricValue(k, metrics[k])))))
      : h("p", { class: "muted" }, "No metrics were recorded for this model.");

    els.modelBody.replaceChildren(
      h("p", { class: "model-name" }, m.name || "model"),
      h("dl", { class: "facts" },
        h("div", {}, h("dt", {}, "Architecture"), h("dd", {}, h("code", {}, m.architecture || "?"))),
        h("div", {}, h("dt", {}, "Task"), h("dd", {}, taskLabel(m))),
        m.input_size ? h("div", {}, h("dt", {}, "Input"), h("dd", {}, `${m.input_size}×${m.input_size} px`)) : null),
      h("h3", { class: "subhead" }, "Classes ",
        h("span", { class: "count", id: "class-count", "aria-label": `${classes.length} classes` }, String(classes.length))),
      classBlock,
      h("h3", { class: "subhead" }, "Validation metrics ", h("span", { class: "muted" }, `(${split} split)`)),
      metricBlock,
    );
  }

  function renderExamples(examples) {
    if (!examples.length) {
      els.examples.hidden = true;
      return;
    }
    els.exampleList.replaceChildren(
      ...examples.map((src) => {
        const name = decodeURIComponent(String(src).split("/").pop() || src);
        return h("li", {},
          h("button", {
            type: "button", class: "example", title: name,
            "aria-label": `Classify the example ${name}`,
            onclick: () => classifyAddress(src),
          }, h("img", { src, alt: "", loading: "lazy", width: 64, height: 64 })));
      }),
    );
    els.examples.hidden = false;
    if (!els.urlInput.value) els.urlInput.placeholder = examples[0];
  }

  function configureSettings(m) {
    const n = (m.classes || []).length || 1;
    if (m.task === "multi") {
      els.topkLabel.textContent = "Tags under threshold to list";
      els.topkInput.min = "0";
      els.topkInput.max = String(n);
      els.topkInput.value = String(Math.min(BELOW_DEFAULT, n));
      els.thresholdField.hidden = false;
    } else {
      els.topkLabel.textContent = "Classes to show (top-k)";
      els.topkInput.min = "1";
      els.topkInput.max = String(n);
      els.topkInput.value = String(Math.min(Math.max(m.default_top_k || 5, 1), n));
      els.topkField.hidden = isBinary(m);
      els.thresholdField.hidden = true;
    }
  }

  function topK() {
    const m = state.model;
    const max = m && m.classes ? m.classes.length : 1000;
    const v = Math.round(Number(els.topkInput.value));
    const fallback = m && m.default_top_k ? m.default_top_k : 5;
    return Math.min(Math.max(Number.isFinite(v) && v >= 1 ? v : fallback, 1), max);
  }

  function belowCount() {
    const v = Math.round(Number(els.topkInput.value));
    return Number.isFinite(v) && v >= 0 ? v : BELOW_DEFAULT;
  }

  function customThreshold() {
    if (!state.model || state.model.task !== "multi" || !els.thresholdCustom.checked) return null;
    return Number(els.thresholdInput.value);
  }

  // ---------------------------------------------------------------- images in

  function useImage(blob, name) {
    state.image = { blob, name: name || "image" };
    clearHeatmaps();
    showPreview(blob, state.image.name);
    predict();
  }

  function showPreview(blob, name) {
    if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
    state.previewUrl = URL.createObjectURL(blob);
    const img = els.previewImg;
    const caption = `${name} · ${humanBytes(blob.size)}`;
    img.hidden = false;
    img.alt = `Preview of ${name}`;
    img.onload = () => {
      els.previewCaption.textContent = `${caption} · ${img.naturalWidth}×${img.naturalHeight}`;
    };
    img.onerror = () => {
      img.hidden = true;
      els.previewCaption.textContent = `${caption} · no preview: the browser cannot show this file`;
    };
    img.src = state.previewUrl;
    els.previewCaption.textContent = caption;
    els.dropzone.querySelector(".preview-replace").hidden = false;
    els.preview.hidden = false;
    els.dropEmpty.hidden = true;
    els.dropzone.classList.add("has-image");
    els.dropzone.setAttribute("aria-label", `Image: ${name}. Press Enter to choose another image`);
  }

  /** Fetch an image of this server (an example, or a pasted address) and classify it. */
  async function classifyAddress(raw) {
    const text = String(raw || "").trim();
    if (!text) {
      showError("No address given", "Paste the address of an image on this server, for example /examples/cat.jpg.");
      return;
    }
    let url;
    try {
      url = new URL(text, window.location.href);
    } catch {
      showError("That isn't an address", `“${text}” is not a web address. Try something like /examples/cat.jpg.`);
      return;
    }
    if (url.origin !== window.location.origin) {
      showError(
        "Only this server's images, please",
        `This page only fetches images from ${window.location.origin}; ${url.origin === "null" ? "that address" : url.origin} is somewhere else. Download the image and drop it here instead.`,
      );
      return;
    }
    clearError();
    const seq = ++state.seq;
    setBusy("Fetching the image…");
    let res;
    try {
      res = await fetch(url.pathname + url.search, { headers: { Accept: "image/*" } });
    } catch {
      if (seq === state.seq) showError("Could not fetch the image", `${url.pathname} could not be reached.`);
      return;
    }
    if (seq !== state.seq) return;
    if (!res.ok) {
      const err = await responseError(res);
      showError(`Could not fetch ${url.pathname}`, err.message, ` HTTP ${err.status}`, err.hint);
      return;
    }
    const blob = await res.blob();
    if (seq !== state.seq) return;
    const name = decodeURIComponent(url.pathname.split("/").pop() || "image");
    useImage(blob, name);
  }

  // ---------------------------------------------------------------- predict

  let rerunTimer = 0;
  function rerunSoon() {
    clearTimeout(rerunTimer);
    if (state.image) rerunTimer = setTimeout(predict, 250);
  }

  async function predict() {
    if (!state.image) return;
    const seq = ++state.seq;
    clearError();
    clearHeatmaps(); // they belong to the previous answer (its threshold may differ)
    setBusy("Classifying…");

    const query = predictParams().toString();
    const headers = requestHeaders();
    const started = performance.now();
    let res;
    for (let attempt = 0; ; attempt += 1) {
      const form = new FormData();
      form.append("file", state.image.blob, state.image.name);
      try {
        res = await fetch(query ? `/predict?${query}` : "/predict", { method: "POST", body: form, headers });
      } catch {
        if (seq === state.seq) showError("Could not reach the server", "Check your connection and try again.");
        return;
      }
      if (seq !== state.seq) return;
      // 503 with Retry-After: the model is still loading or the queue is full; wait a bit
      const wait = Number(res.headers.get("Retry-After"));
      if (res.status !== 503 || attempt >= NOT_READY_RETRIES || !(wait >= 0 && wait <= 5)) break;
      setBusy("The model is still loading…");
      await new Promise((resolve) => setTimeout(resolve, Math.max(wait, 0.5) * 1000));
      if (seq !== state.seq) return;
    }
    if (!res.ok) {
      const err = await responseError(res);
      if (seq !== state.seq) return;
      state.answer = null;
      els.why.hidden = true;
      els.result.replaceChildren(h("p", { class: "placeholder" }, "No answer for this file."));
      showError(errorTitle(err.status, err.type), err.message,
        ` ${err.type ? `${err.type} · ` : ""}HTTP ${err.status}`, err.hint);
      if (err.status === 401) {
        els.apikeyField.hidden = false;
        els.apikeyInput.focus();
      }
      return;
    }
    let answer;
    try {
      answer = await res.json();
    } catch {
      if (seq === state.seq) showError("Unexpected answer", "The server's answer was not JSON.");
      return;
    }
    if (seq !== state.seq) return;
    state.answer = answer;
    renderAnswer(answer);
    const ms = Math.round(performance.now() - started);
    setIdle(`Answered in ${ms} ms`);
    els.why.hidden = false;
    revealAnswer();
    if (state.why) explain(seq);
  }

  function predictParams() {
    const params = new URLSearchParams();
    if (!state.model || state.model.task !== "multi") params.set("top_k", String(topK()));
    const thr = customThreshold();
    if (thr !== null) params.set("threshold", String(thr));
    return params;
  }

  function requestHeaders() {
    const headers = { Accept: "application/json" };
    const key = els.apikeyInput.value.trim();
    if (key) headers["X-Api-Key"] = key;
    return headers;
  }

  // ---------------------------------------------------------------- "why?": heatmaps

  function clearHeatmaps() {
    state.explanations = null;
    state.shownLabel = null;
    els.whyOverlay.hidden = true;
    els.whyOverlay.removeAttribute("src");
    els.whyClasses.hidden = true;
    els.whyClasses.replaceChildren();
    els.whyStatus.textContent = "";
  }

  function setWhy(on) {
    state.why = on;
    els.whyToggle.setAttribute("aria-pressed", on ? "true" : "false");
    if (!on) {
      els.whyOverlay.hidden = true;
      els.whyClasses.hidden = true;
      els.whyStatus.textContent = "";
    } else if (state.explanations) {
      renderHeatmaps();
    } else if (state.answer) {
      explain(state.seq);
    }
  }

  /** Ask the server for the heatmaps of the answer shown (the same image and options). */
  async function explain(seq) {
    if (!state.image || seq !== state.seq) return;
    els.whyStatus.textContent = "Drawing the heatmap…";
    const params = predictParams();
    params.set("explain", "true");
    let res;
    for (let attempt = 0; ; attempt += 1) {
      const form = new FormData();
      form.append("file", state.image.blob, state.image.name);
      try {
        res = await fetch(`/predict?${params}`, { method: "POST", body: form, headers: requestHeaders() });
      } catch {
        if (seq === state.seq) els.whyStatus.textContent = "Could not reach the server for the heatmap.";
        return;
      }
      if (seq !== state.seq) return;
      const wait = Number(res.headers.get("Retry-After"));
      if (res.status !== 503 || attempt >= EXPLAIN_RETRIES || !(wait >= 0 && wait <= 5)) break;
      els.whyStatus.textContent = "The server is busy drawing other heatmaps; waiting…";
      await new Promise((resolve) => setTimeout(resolve, Math.max(wait, 0.5) * 1000));
      if (seq !== state.seq) return;
    }
    if (!res.ok) {
      const err = await responseError(res);
      if (seq === state.seq) els.whyStatus.textContent = `No heatmap: ${err.message} (HTTP ${err.status})`;
      return;
    }
    let answer;
    try {
      answer = await res.json();
    } catch {
      answer = null;
    }
    if (seq !== state.seq) return;
    const found = answer && Array.isArray(answer.explanations) ? answer.explanations : [];
    if (!found.length) {
      els.whyStatus.textContent = "The server sent no heatmap for this answer.";
      return;
    }
    state.explanations = found;
    state.shownLabel = found[0].label;
    if (state.why) renderHeatmaps();
  }

  function renderHeatmaps() {
    const found = state.explanations || [];
    els.whyStatus.textContent = "";
    // one button per class explained; with one class there is nothing to choose
    els.whyClasses.replaceChildren(...found.map((e) =>
      h("button", {
        type: "button", class: "why-class", "data-label": e.label,
        "aria-pressed": e.label === state.shownLabel ? "true" : "false",
        onclick: () => { state.shownLabel = e.label; renderHeatmaps(); },
      }, `${readable(e.label)} · ${pct(e.score)}`)));
    els.whyClasses.hidden = found.length < 2;
    const shown = found.find((e) => e.label === state.shownLabel) || found[0];
    if (!shown) return;
    els.whyOverlay.src = `data:image/png;base64,${shown.overlay_png}`;
    els.whyOverlay.alt = `Heatmap: where the model saw ${readable(shown.label)} in ${state.image ? state.image.name : "the image"}`;
    els.whyOverlay.setAttribute("data-label", shown.label);
    els.whyOverlay.hidden = false;
    els.whyStatus.textContent = found.length < 2
      ? `Red: where the model found the most evidence for ${readable(shown.label)}.`
      : `Red: where the model found the most evidence for ${readable(shown.label)}. Pick a class to see its heatmap.`;
  }

  // ---------------------------------------------------------------- answers

  /** On a one-column (phone) layout the answer is below the image: bring it into view. */
  function revealAnswer() {
    if (!window.matchMedia("(max-width: 879px)").matches) return;
    const card = els.result.closest(".card");
    const top = card.getBoundingClientRect().top;
    if (top > window.innerHeight * 0.6 || top < 0) {
      const smooth = !window.matchMedia("(prefers-reduced-motion: reduce)").matches;
      card.scrollIntoView({ behavior: smooth ? "smooth" : "auto", block: "start" });
    }
  }

  /** [{label, score}] for every class we know a score of, highest first. */
  function rankedScores(answer) {
    const scores = { ...(answer.scores || {}) };
    for (const t of answer.top || []) if (!(t.label in scores)) scores[t.label] = t.score;
    return Object.entries(scores)
      .map(([label, score]) => ({ label, score: Number(score) }))
      .sort((a, b) => b.score - a.score);
  }

  function scoreOf(answer, label) {
    if (answer.scores && typeof answer.scores[label] === "number") return answer.scores[label];
    const t = (answer.top || []).find((x) => x.label === label);
    return t ? t.score : null;
  }

  function bar(score, { tick = null, large = false } = {}) {
    const fill = h("span", { class: "bar-fill" });
    const el = h("span", { class: `bar${large ? " bar-lg" : ""}`, "aria-hidden": "true" }, fill);
    const width = `${Math.min(Math.max(score || 0, 0), 1) * 100}%`;
    fill.style.width = "0";
    requestAnimationFrame(() => requestAnimationFrame(() => { fill.style.width = width; }));
    if (tick !== null && Number.isFinite(tick)) {
      const t = h("span", { class: "bar-tick", title: `threshold ${pct(tick)}` });
      t.style.left = `${Math.min(Math.max(tick, 0), 1) * 100}%`;
      el.append(t);
    }
    return el;
  }

  function row(label, score, { cls = "", note = null, tick = null, srNote = null, over = null } = {}) {
    return h("li", { class: `row ${cls}`.trim(), "data-label": label, "data-over": over },
      h("div", { class: "row-head" },
        h("span", { class: "row-label" }, note, h("span", { class: "row-name" }, label)),
        h("span", { class: "row-pct" }, pct(score), srNote ? h("span", { class: "visually-hidden" }, srNote) : null)),
      bar(score, { tick }));
  }

  function renderAnswer(answer) {
    const m = state.model;
    const task = answer.task || (m && m.task) || "single";
    const classes = (m && m.classes) || rankedScores(answer).map((x) => x.label);
    let view;
    if (task === "multi") view = renderMulti(answer, classes);
    else if (classes.length === 2) view = renderBinary(answer, classes);
    else view = renderTopK(answer);
    els.result.replaceChildren(view);
  }

  function renderBinary(answer, classes) {
    const [neg, pos] = classes;
    let p = scoreOf(answer, pos);
    if (p === null) {
      const q = scoreOf(answer, neg);
      p = q === null ? 0 : 1 - q;
    }
    const picked = (answer.labels && answer.labels[0]) || (p >= 0.5 ? pos : neg);
    const yes = picked === pos;
    return h("div", { class: `binary ${yes ? "is-yes" : "is-no"}` },
      h("div", { class: "headline" },
        h("p", { class: "question" }, `Is it ${readable(pos)}?`),
        h("p", { class: "answer-line" },
          h("span", { class: "big-pct" }, pct(p)),
          h("span", { class: `pill ${yes ? "pill-yes" : "pill-no"}` }, yes ? "Yes" : "No"),
          h("span", { class: "verdict" }, "the model says ", h("strong", {}, picked)))),
      h("ul", { class: "rows", "aria-label": "Probabilities" },
        [pos, neg].map((c) => row(c, scoreOf(answer, c) ?? (c === pos ? p : 1 - p),
          { cls: c === picked ? "is-top" : "" }))));
  }

  function renderTopK(answer) {
    const k = topK();
    let top = (answer.top || []).map((t) => ({ label: t.label, score: Number(t.score) }));
    if (!top.length) top = rankedScores(answer);
    top = top.slice(0, k);
    const best = top[0];
    const picked = (answer.labels && answer.labels[0]) || (best && best.label);
    return h("div", { class: "topk" },
      h("div", { class: "headline" },
        h("p", { class: "question" }, "It looks like ", h("strong", {}, picked || "?")),
        h("p", { class: "big-pct" }, best ? pct(scoreOf(answer, picked) ?? best.score) : "–")),
      h("h3", { class: "subhead" }, `Top ${top.length} of ${(state.model && state.model.classes || []).length || top.length}`),
      h("ol", { class: "rows" },
        top.map((t) => row(t.label, t.score, { cls: t.label === picked ? "is-top" : "" }))));
  }

  function renderMulti(answer, classes) {
    const m = state.model || {};
    const custom = customThreshold();
    const thresholdOf = (label) => {
      if (custom !== null) return custom;
      const i = classes.indexOf(label);
      return m.thresholds && i >= 0 && typeof m.thresholds[i] === "number" ? m.thresholds[i] : 0.5;
    };
    const ranked = rankedScores(answer);
    const labels = new Set(answer.labels || []);
    const over = ranked.filter((x) => labels.has(x.label));
    // labels the server chose that have no score (should not happen): still list them
    for (const l of labels) if (!over.some((x) => x.label === l)) over.push({ label: l, score: null });
    const below = ranked.filter((x) => !labels.has(x.label)).slice(0, belowCount());

    const overRows = over.map((x) =>
      row(x.label, x.score, {
        cls: "is-over", over: "true", tick: thresholdOf(x.label),
        note: h("span", { class: "tick-badge", "aria-hidden": "true" }, "✓"),
        srNote: ` — over its threshold of ${pct(thresholdOf(x.label))}`,
      }));
    const belowRows = below.map((x) =>
      row(x.label, x.score, {
        cls: "is-below", over: "false", tick: thresholdOf(x.label),
        srNote: ` — under its threshold of ${pct(thresholdOf(x.label))}`,
      }));

    return h("div", { class: "multi" },
      h("div", { class: "headline" },
        h("p", { class: "question" },
          over.length ? `${over.length} ${over.length === 1 ? "tag" : "tags"} found` : "No tag reached its threshold"),
        h("p", { class: "muted small" }, custom !== null
          ? `Threshold ${pct(custom)} for every tag`
          : "Each tag has its own threshold (the mark on its bar)")),
      over.length
        ? h("ul", { class: "rows rows-over", "aria-label": "Tags over their threshold" }, overRows)
        : null,
      belowRows.length
        ? h("div", {},
            h("h3", { class: "subhead" }, "Next below the threshold"),
            h("ul", { class: "rows rows-below", "aria-label": "Tags under their threshold" }, belowRows))
        : null);
  }

  // ---------------------------------------------------------------- wiring

  function firstImageFile(fileList) {
    const files = Array.from(fileList || []);
    return files.find((f) => f.type.startsWith("image/")) || files[0] || null;
  }

  function wire() {
    els.originLabel.textContent = window.location.origin;

    // file picker
    els.dropzone.addEventListener("click", () => els.fileInput.click());
    els.dropzone.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " " || e.key === "Spacebar") {
        e.preventDefault();
        els.fileInput.click();
      }
    });
    els.fileInput.addEventListener("change", () => {
      const file = els.fileInput.files && els.fileInput.files[0];
      if (file) useImage(file, file.name);
      els.fileInput.value = ""; // choosing the same file again still fires "change"
    });

    // drag and drop
    let depth = 0;
    const hasPayload = (e) => e.dataTransfer && Array.from(e.dataTransfer.types || []).some(
      (t) => t === "Files" || t === "text/uri-list");
    els.dropzone.addEventListener("dragenter", (e) => {
      if (!hasPayload(e)) return;
      e.preventDefault();
      depth += 1;
      els.dropzone.classList.add("is-dragging");
    });
    els.dropzone.addEventListener("dragover", (e) => {
      if (!hasPayload(e)) return;
      e.preventDefault();
      e.dataTransfer.dropEffect = "copy";
    });
    els.dropzone.addEventListener("dragleave", () => {
      depth = Math.max(0, depth - 1);
      if (!depth) els.dropzone.classList.remove("is-dragging");
    });
    els.dropzone.addEventListener("drop", (e) => {
      e.preventDefault();
      depth = 0;
      els.dropzone.classList.remove("is-dragging");
      const file = firstImageFile(e.dataTransfer.files);
      if (file) return useImage(file, file.name);
      const uri = (e.dataTransfer.getData("text/uri-list") || "").split(/\r?\n/).find((l) => l && !l.startsWith("#"));
      if (uri) classifyAddress(uri);
    });
    // a file dropped next to the zone must not make the browser leave the page
    window.addEventListener("dragover", (e) => { if (hasPayload(e)) e.preventDefault(); });
    window.addEventListener("drop", (e) => { if (hasPayload(e)) e.preventDefault(); });

    // paste an image from the clipboard
    document.addEventListener("paste", (e) => {
      const file = firstImageFile(e.clipboardData && e.clipboardData.files);
      if (file && file.type.startsWith("image/")) {
        e.preventDefault();
        useImage(file, file.name || "pasted image");
      }
    });

    // an address of one of this server's images
    els.urlForm.addEventListener("submit", (e) => {
      e.preventDefault();
      classifyAddress(els.urlInput.value || "");
    });

    // settings
    els.topkInput.addEventListener("change", () => {
      if (state.model && state.model.task === "multi") {
        if (state.answer) renderAnswer(state.answer);
      } else {
        rerunSoon();
      }
    });
    els.thresholdCustom.addEventListener("change", () => {
      els.thresholdInput.disabled = !els.thresholdCustom.checked;
      rerunSoon();
    });
    els.thresholdInput.addEventListener("input", () => {
      els.thresholdOutput.textContent = pct(Number(els.thresholdInput.value));
    });
    els.thresholdInput.addEventListener("change", rerunSoon);
    els.apikeyInput.addEventListener("change", rerunSoon);

    // "why?": the heatmaps of the answer, over the picture
    els.whyToggle.addEventListener("click", () => setWhy(!state.why));
  }

  wire();
  loadModel();
})();
