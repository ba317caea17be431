// diffusiond's web page: plain JavaScript, no build step, nothing fetched but this server's API.
// Every URL is relative, so the page works on any host and under any path prefix.
"use strict";

(() => {
  const MAX_TEXT = 10000;
  const MAX_SEED = 4294967295;
  const { ApiError, api, errorOf, storedKey } = window.DiffusiondHttp; // http.js
  const edit = window.DiffusiondEdit; // the input image and its mask (edit.js)
  const choices = window.DiffusiondChoices; // model, LoRAs, sampler, scheduler (choices.js)
  const results = window.DiffusiondResults; // the result list (results.js)
  const progress = window.DiffusiondProgress; // one job followed and shown (progress.js)
  const jobs = window.DiffusiondJobs; // the recent jobs list (jobs.js)
  const { TERMINAL, jobPath, showState, setBar, formatMs } = progress;
  // In the order of the form: the first one with an error takes the focus.
  const FIELDS = [...choices.MODEL_FIELDS, "prompt", "negativePrompt", ...edit.FIELDS, "width",
    "height", "steps", "cfgScale", ...choices.SAMPLING_FIELDS, "seed", "count"];
  // The mask's errors are shown by the canvas, which takes no focus: its Clear button does.
  const FOCUS = { maskImage: "mask-clear" };

  const $ = (id) => document.getElementById(id);
  const state = {
    maxBatch: 5,
    job: null, // {id, request, abort: AbortController} while one is followed
    sizeBefore: null, // {size, width, height} chosen before an input image set its own size
  };

  // -- the server's state ----------------------------------------------------------------

  async function loadHealth() {
    let response;
    try {
      // With the key (if this browser holds one) /health names the model; without, it
      // says only what the form needs. It never asks for the key: the page opens without.
      const key = storedKey();
      const headers = key ? { Authorization: `Bearer ${key}` } : {};
      response = await fetch("health", { cache: "no-store", headers });
    } catch {
      $("server-info").textContent = "The server cannot be reached.";
      return;
    }
    if (!response.ok) {
      const error = await errorOf(response);
      $("server-info").textContent = `Server not ready: ${error.message}`;
      if (error.code === "SERVER_NOT_READY") setTimeout(loadHealth, 2000);
      return;
    }
    const health = await response.json();
    state.maxBatch = Number.isInteger(health.maxBatch) ? health.maxBatch : state.maxBatch;
    if (Number.isInteger(health.pollIntervalMs)) progress.setPollMs(health.pollIntervalMs);
    $("count").max = String(state.maxBatch);
    $("count-hint").textContent = `(1–${state.maxBatch})`;
    if (health.architecture) choices.useServerArchitecture(health.architecture);
    const parts = [health.model, health.device, health.version && `v${health.version}`];
    // Without the key /health names no model: then say only the version.
    const label = health.model ? "Model" : "diffusiond";
    $("server-info").textContent = `${label} ${parts.filter(Boolean).join(" · ")}`;
  }

  // -- the form: the API's rules, checked before sending ----------------------------------

  function intRule(field, low, high, extra = "") {
    return `${field} must be an integer from ${low} to ${high}${extra}`;
  }

  function readInt(id) {
    const text = $(id).value.trim();
    if (!/^-?\d+$/.test(text)) return null;
    return Number(text);
  }

  function checkForm() {
    const errors = {};
    const body = {};
    const prompt = $("prompt").value;
    if (!prompt.trim()) errors.prompt = "prompt must not be empty or only whitespace";
    else if (prompt.length > MAX_TEXT) {
      errors.prompt = `prompt must be at most ${MAX_TEXT} characters, got ${prompt.length}`;
    }
    body.prompt = prompt;
    const negative = $("negativePrompt").value;
    if (negative.length > MAX_TEXT) {
      errors.negativePrompt =
        `negativePrompt must be at most ${MAX_TEXT} characters, got ${negative.length}`;
    }
    body.negativePrompt = negative;
    edit.check(body, errors);
    if (sizeFromInput()) checkInputSize(errors);
    else checkSize(body, errors);
    const steps = readInt("steps");
    if (steps === null || steps < 1 || steps > 150) errors.steps = intRule("steps", 1, 150);
    body.steps = steps;
    const cfgText = $("cfgScale").value.trim();
    const cfg = cfgText === "" ? NaN : Number(cfgText);
    if (!Number.isFinite(cfg) || cfg < 0 || cfg > 30) {
      errors.cfgScale = "cfgScale must be a number from 0 to 30";
    }
    body.cfgScale = cfg;
    choices.check(body, errors);
    if ($("seedRandom").checked) {
      body.seed = null;
    } else {
      const seed = readInt("seed");
      if (seed === null || seed < 0 || seed > MAX_SEED) {
        errors.seed = `${intRule("seed", 0, MAX_SEED)}, or tick "Random seed"`;
      }
      body.seed = seed;
    }
    const count = readInt("count");
    if (count === null || count < 1 || count > state.maxBatch) {
      errors.count = intRule("count", 1, state.maxBatch);
    }
    body.count = count;
    body.preview = $("preview").checked;
    return { body, errors };
  }

  function checkSize(body, errors) {
    for (const field of ["width", "height"]) {
      const value = readInt(field);
      if (value === null || value < 64 || value > 2048 || value % 8 !== 0) {
        errors[field] = intRule(field, 64, 2048, ", a multiple of 8");
      }
      body[field] = value;
    }
  }

  /** No width or height is sent: the server makes the input's size, rounded down to 8. */
  function checkInputSize(errors) {
    const { width, height } = edit.inputSize();
    const made = madeSize(width, height);
    if (made.some((side) => side < 64)) {
      errors.initImage = `initImage is ${width}×${height}, which makes a ${made[0]}×${made[1]} ` +
        "image: width and height must be at least 64; choose a size below";
    }
  }

  /** The size the server makes from an input image without width and height: its own,
   * scaled to fit 2048 (and the server's pixel budget, which the page does not know),
   * rounded down to a multiple of 8. */
  function madeSize(width, height) {
    const scale = Math.min(1, 2048 / width, 2048 / height);
    return [width, height].map((side) => Math.floor(Math.floor(side * scale) / 8) * 8);
  }

  function sizeFromInput() {
    return $("size").value === "input" && edit.hasInput();
  }

  function clearError(field) {
    $(`${field}-error`).textContent = "";
    if ($(field)) $(field).removeAttribute("aria-invalid");
  }

  function clearErrors() {
    for (const field of FIELDS) clearError(field);
    $("form-error").textContent = "";
  }

  function showFieldError(field, message) {
    $(`${field}-error`).textContent = message;
    if ($(field)) $(field).setAttribute("aria-invalid", "true");
  }

  function focusField(field) {
    (choices.focusTarget(field) || $(FOCUS[field] || field)).focus();
  }

  function showErrors(errors) {
    const fields = FIELDS.filter((field) => field in errors);
    for (const field of fields) showFieldError(field, errors[field]);
    if (fields.length) focusField(fields[0]);
    return fields.length;
  }

  function syncSize() {
    const value = $("size").value;
    $("size-help").hidden = !edit.hasInput();
    if (value === "custom") return;
    const input = edit.inputSize();
    const [width, height] = value === "input" && input
      ? madeSize(input.width, input.height)
      : value.split("x");
    for (const [field, size] of [["width", width], ["height", height]]) {
      $(field).value = String(size);
      clearError(field);
    }
  }

  /** An input image came (SIZE is its size) or went (null): the size follows it. */
  function inputChanged(size) {
    const option = $("size-input");
    const wasInput = $("size").value === "input";
    option.hidden = size === null;
    option.disabled = size === null;
    if (size) {
      const made = madeSize(size.width, size.height);
      option.textContent = `Input image's size (${made[0]} × ${made[1]})`;
      if ($("size").value !== "input") {
        state.sizeBefore = { size: $("size").value, width: $("width").value, height: $("height").value };
      }
      $("size").value = "input";
    } else if (wasInput) {
      const before = state.sizeBefore || { size: "512x512", width: "512", height: "512" };
      $("size").value = before.size;
      $("width").value = before.width;
      $("height").value = before.height;
    }
    syncSize();
  }

  function sizeFromFields() {
    const wanted = `${$("width").value}x${$("height").value}`;
    const preset = [...$("size").options].find((option) => option.value === wanted);
    $("size").value = preset ? preset.value : "custom";
  }

  function setSeedRandom(random) {
    $("seedRandom").checked = random;
    $("seed").disabled = random;
  }

  function setRunning(running) {
    $("generate").disabled = running;
    $("cancel").disabled = !running;
  }

  function say(message) {
    $("status").textContent = message;
  }

  // -- generating --------------------------------------------------------------------------

  async function onGenerate(event) {
    event.preventDefault();
    if (state.job) return;
    clearErrors();
    const { body, errors } = checkForm();
    if (showErrors(errors)) {
      say("Some fields need a fix before the request can be sent.");
      return;
    }
    setRunning(true);
    say("Sending the request…");
    progress.resetProgress();
    await edit.addMask(body);
    let response;
    try {
      response = await api("v1/images/generations", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
    } catch (error) {
      setRunning(false);
      say(error instanceof ApiError ? error.message : `The server cannot be reached: ${error}`);
      return;
    }
    if (!response.ok) {
      setRunning(false);
      refused(await errorOf(response), body);
      return;
    }
    const created = await response.json();
    follow(created.id, body);
  }

  function refused(error, body) {
    let field = error.details && error.details.field;
    if (error.status === 413 && body.initImage) { // the images made it too big
      field = "initImage";
      error.message = `${error.message}, with the images in it: pick a smaller input image`;
    }
    if ((error.status === 400 || error.status === 413) && FIELDS.includes(field)) {
      showFieldError(field, error.message);
      focusField(field);
      say(`The server refused the request: ${error.message}`);
    } else if (error.code === "SERVER_BUSY") {
      const wait = error.retryAfter ? ` Try again in ${error.retryAfter} s.` : "";
      say(`The server is busy with other generations.${wait}`);
      $("form-error").textContent = `Server busy: ${error.message}.${wait}`;
    } else {
      const hint = error.suggestion ? ` ${error.suggestion}` : "";
      say(`The server refused the request: ${error.message}`);
      $("form-error").textContent = `${error.message}${hint}`;
    }
  }

  /** Follow a job to its end: the event stream, else polling; then show the result. */
  async function follow(id, request) {
    const abort = new AbortController();
    state.job = { id, request, abort };
    setRunning(true);
    say(`Generating… (job ${id})`);
    let final = null;
    try {
      final = await progress.followStream(id, abort.signal);
    } catch (error) {
      if (error instanceof ApiError) console.info("event stream unavailable:", error.message);
      else console.info("event stream broke, polling instead:", error);
    }
    try {
      if (!final) final = await progress.pollUntilDone(id, abort.signal);
    } catch (error) {
      say(`Lost track of generation ${id}: ${error.message}`);
      final = null;
    }
    state.job = null;
    setRunning(false);
    if (final) await finish(final, request);
    jobs.refresh();
  }

  async function onCancel() {
    const job = state.job;
    if (!job) return;
    $("cancel").disabled = true;
    say("Cancelling…");
    try {
      const response = await api(jobPath(job.id), { method: "DELETE" });
      if (!response.ok && response.status !== 409) {
        say(`The cancel was refused: ${(await errorOf(response)).message}`);
        $("cancel").disabled = false;
      }
    } catch (error) {
      say(`The cancel failed: ${error.message}`);
      $("cancel").disabled = false;
    }
  }

  async function finish(job, request) {
    $("preview-figure").hidden = true;
    if (job.status === "complete") {
      const images = job.result.images;
      setBar(100, `Complete · ${images.length} image${images.length === 1 ? "" : "s"}`);
      const took = typeof job.result.timeTaken === "number" ? ` in ${formatMs(job.result.timeTaken)}` : "";
      say(`Complete: ${images.length} image${images.length === 1 ? "" : "s"}${took}.`);
      results.add(job, request);
    } else if (job.status === "cancelled") {
      setBar(0, "Cancelled");
      say(`Generation ${job.id} cancelled.`);
    } else if (job.status === "error") {
      const error = job.error || {};
      setBar(0, "Failed");
      say(`The generation failed: ${error.message || "unknown error"} (${error.code || "?"}).`);
    }
  }

  // -- taking a result back into the form -------------------------------------------

  function reuseSeed(seed) {
    setSeedRandom(false);
    $("seed").value = String(seed);
    $("count").value = "1";
    $("seed").focus();
    say(`Seed ${seed} is in the form; press Generate to draw it again.`);
  }

  async function useAsInput(blob, fileName, name) {
    if (!(await edit.useImage(blob, fileName))) return;
    $("editor").scrollIntoView({ block: "start" });
    $("strength").focus({ preventScroll: true });
    say(`The generated ${name} is the input image: paint a mask on it or press Generate.`);
  }

  /** The form filled from a result's RECIPE (its PNG's), to draw NAME again or vary it. */
  function useSettings(recipe, name) {
    clearErrors();
    const text = (value) => (value === undefined || value === null ? "" : String(value));
    $("prompt").value = text(recipe.prompt);
    $("negativePrompt").value = text(recipe.negativePrompt);
    for (const field of ["width", "height", "steps", "cfgScale"]) {
      if (recipe[field] !== undefined) $(field).value = text(recipe[field]);
    }
    sizeFromFields(); // the recipe's size is sent, even with an input image
    const missing = choices.restore(recipe);
    if (recipe.sampler && choices.hasSampler(recipe.sampler)) $("sampler").value = recipe.sampler;
    else if (recipe.sampler) missing.push(`the sampler ${recipe.sampler}`);
    if (Number.isInteger(recipe.seed)) {
      setSeedRandom(false);
      $("seed").value = String(recipe.seed);
      $("count").value = "1";
    }
    $("prompt").focus();
    const edited = ["img2img", "inpaint"].includes(recipe.mode)
      ? " Its input image is not kept in it: pick one to edit again." : "";
    const lacking = missing.length ? ` This server lacks ${missing.join(", ")}: left as it was.` : "";
    say(`The settings of ${name} are in the form.${edited}${lacking}`);
  }

  // -- a recent job, opened ----------------------------------------------------------------

  async function openJob(id) {
    try {
      const response = await api(jobPath(id));
      if (!response.ok) throw await errorOf(response);
      const job = await response.json();
      if (job.status === "complete") {
        results.add(job, null);
        say(`Showing the images of ${id}.`);
        $("gallery").firstElementChild.querySelector("button").focus();
      } else if (!TERMINAL.has(job.status) && !state.job) {
        showState(job);
        follow(id, null);
      } else {
        say(`Generation ${id} is ${job.status.replace("_", " ")}.`);
      }
    } catch (error) {
      say(`Cannot show ${id}: ${error.message}`);
      jobs.refresh();
    }
  }

  // -- start -------------------------------------------------------------------------------

  function start() {
    window.DiffusiondHttp.setUp(say);
    $("generate-form").addEventListener("submit", onGenerate);
    $("cancel").addEventListener("click", onCancel);
    $("size").addEventListener("change", syncSize);
    $("width").addEventListener("input", sizeFromFields);
    $("height").addEventListener("input", sizeFromFields);
    $("seedRandom").addEventListener("change", () => {
      setSeedRandom($("seedRandom").checked);
      if (!$("seedRandom").checked) $("seed").focus();
    });
    for (const field of FIELDS) {
      if ($(field)) $(field).addEventListener("input", () => clearError(field));
    }
    edit.setUp({ changed: inputChanged, say });
    results.setUp({ reuseSeed, useAsInput, useSettings });
    jobs.setUp({ open: openJob });
        setSeedRandom($("seedRandom").checked);
    loadHealth();
    jobs.refresh();
    choices.setUp({ say }).finally(() => { document.body.dataset.choices = "ready"; });
    document.body.dataset.ready = "true";
  }

  start();
})();
