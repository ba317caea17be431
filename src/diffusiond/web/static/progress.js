// diffusiond's web page, one job followed to its end: its event stream (else polling) and its
// state shown in the bar, the progress line and the live preview. app.js starts and ends the
// following; this file answers through window.DiffusiondProgress.
"use strict";

window.DiffusiondProgress = (() => {
  const TERMINAL = new Set(["complete", "error", "cancelled"]);
  const STAGES = { loading: "Preparing", diffusion: "Diffusing", decoding: "Decoding" };
  const { api, errorOf } = window.DiffusiondHttp;
  const $ = (id) => document.getElementById(id);
  const state = { pollMs: 500 };

  function jobPath(id, rest = "") {
    return `v1/images/generations/${encodeURIComponent(id)}${rest}`;
  }

  function delay(ms, signal) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(resolve, ms);
      if (signal) {
        signal.addEventListener("abort", () => {
          clearTimeout(timer);
          reject(new DOMException("aborted", "AbortError"));
        }, { once: true });
      }
    });
  }

  async function followStream(id, signal) {
    const response = await api(jobPath(id, "/events"), {
      headers: { Accept: "text/event-stream" },
      signal,
    });
    if (!response.ok || !response.body) throw await errorOf(response);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return null; // the stream ended early: polling takes over
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const event = parseEvent(block);
        if (!event) continue;
        showState(event.data);
        if (TERMINAL.has(event.name)) {
          reader.cancel().catch(() => {});
          return event.data;
        }
      }
    }
  }

  function parseEvent(block) {
    let name = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line === "" || line.startsWith(":")) continue; // heartbeats are comments
      const colon = line.indexOf(":");
      const key = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (key === "event") name = value;
      else if (key === "data") data.push(value);
    }
    if (!data.length) return null;
    return { name, data: JSON.parse(data.join("\n")) };
  }

  async function pollUntilDone(id, signal) {
    for (;;) {
      const response = await api(jobPath(id), { signal });
      if (!response.ok) throw await errorOf(response);
      const job = await response.json();
      showState(job);
      if (TERMINAL.has(job.status)) return job;
      await delay(state.pollMs, signal);
    }
  }

  function formatMs(ms) {
    const seconds = Math.max(0, Math.round(ms / 1000));
    if (seconds < 60) return `${seconds} s`;
    return `${Math.floor(seconds / 60)} min ${seconds % 60} s`;
  }

  function setBar(percent, text) {
    const value = Math.max(0, Math.min(100, percent));
    const bar = $("bar");
    bar.setAttribute("aria-valuenow", String(Math.round(value * 10) / 10));
    bar.setAttribute("aria-valuetext", text);
    $("bar-fill").style.width = `${value}%`;
    $("progress-text").textContent = text;
  }

  function resetProgress() {
    setBar(0, "Waiting for the server…");
    $("preview-figure").hidden = true;
  }

  function showState(job) {
    if (job.status === "pending") {
      const place = job.queuePosition ? `: position ${job.queuePosition} in the queue` : "";
      setBar(0, `Queued${place}`);
      return;
    }
    if (job.status !== "in_progress" || !job.progress) return;
    const p = job.progress;
    const parts = [
      STAGES[p.stage] || p.stage,
      `image ${p.currentImage} of ${p.totalImages}`,
      `step ${p.currentStep}/${p.totalSteps}`,
      `${Math.floor(p.percentage)}%`,
    ];
    if (typeof p.etaMs === "number") parts.push(`ETA ${formatMs(p.etaMs)}`);
    setBar(p.percentage, parts.join(" · "));
    if (p.preview && p.preview.image) {
      $("preview-image").src = `data:image/${p.preview.format || "jpeg"};base64,${p.preview.image}`;
      $("preview-caption").textContent =
        `Preview of image ${p.currentImage} of ${p.totalImages} at step ${p.preview.step}`;
      $("preview-figure").hidden = false;
    }
  }

  return {
    TERMINAL,
    jobPath,
    followStream,
    pollUntilDone,
    showState,
    setBar,
    resetProgress,
    formatMs,
    setPollMs: (ms) => { state.pollMs = ms; },
  };
})();
