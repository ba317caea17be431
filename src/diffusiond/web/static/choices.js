// diffusiond's web page, what an image is drawn with: the model, its LoRAs and their weights,
// the sampler, the scheduler and clip skip. The lists come from the server (GET /v1/models,
// /v1/loras, /v1/samplers); a server without those routes keeps the page's own sampler and
// scheduler lists, and the model and LoRA pickers stay hidden (nothing of theirs is sent).
// app.js owns the form; this file owns these controls and answers through
// window.DiffusiondChoices.
"use strict";

window.DiffusiondChoices = (() => {
  const MAX_LORAS = 8;
  const MAX_WEIGHT = 5;
  const DEFAULT_SCHEDULER = "discrete";
  const http = window.DiffusiondHttp;
  const $ = (id) => document.getElementById(id);

  let models = null; // [{id, architecture, format, loaded, default}] from the server, or null
  let loras = null; // [{name, architecture}] from the server, or null
  let serverArchitecture = null; // /health's, for a server that lists no models
  let rowCount = 0; // ids of LoRA rows are never reused, so labels stay tied to their control
  let hooks = { say: () => {} };

  // -- the lists, from the server ----------------------------------------------------------

  /** The JSON body of GET PATH, or null when the server has no such route or refused it. */
  async function listed(path) {
    try {
      const response = await http.api(path);
      if (response.ok) return await response.json();
      if (response.status !== 404) console.info(`${path}:`, (await http.errorOf(response)).message);
    } catch (error) {
      console.info(`${path} unavailable:`, error.message);
    }
    return null;
  }

  const nameOf = (entry) => (typeof entry === "string" ? entry : entry && entry.name);

  function fillSelect(select, names, preferred) {
    const keep = select.value;
    select.replaceChildren(...names.map((name) => new Option(name, name)));
    select.value = names.includes(keep) ? keep : (names.includes(preferred) ? preferred : names[0]);
  }

  function showSamplers(body) {
    if (!body) return; // no route: the lists written in index.html stay
    const samplers = (body.samplers || []).map(nameOf).filter(Boolean);
    const schedulers = (body.schedulers || []).map(nameOf).filter(Boolean);
    if (samplers.length) fillSelect($("sampler"), samplers, "euler_a");
    if (schedulers.length) fillSelect($("scheduler"), schedulers, DEFAULT_SCHEDULER);
  }

  function modelLabel(model) {
    const marks = [model.architecture, model.format];
    if (model.default) marks.push("default");
    if (model.loaded) marks.push("loaded");
    return `${model.id} (${marks.filter(Boolean).join(", ")})`;
  }

  /** "diffusion_model flux.gguf · vae ae.safetensors · ..." for split components, or "". */
  function componentsText(model) {
    const parts = model && model.components && typeof model.components === "object"
      ? Object.entries(model.components) : [];
    return parts.map(([role, file]) => `${role} ${file}`).join(" · ");
  }

  function showModelFiles() {
    const text = componentsText(chosenModel());
    $("model-files").hidden = !text;
    $("model-files").textContent = text ? `Files: ${text}` : "";
  }

  function showModels(body) {
    const list = body && Array.isArray(body.models) ? body.models.filter((m) => m && m.id) : [];
    models = list.length ? list : null;
    $("model-field").hidden = models === null;
    if (!models) return;
    const select = $("model");
    select.replaceChildren(...models.map((model) => {
      const option = new Option(modelLabel(model), model.id);
      if (componentsText(model)) option.title = componentsText(model);
      return option;
    }));
    const preferred = models.find((model) => model.default) || models[0];
    select.value = preferred.id;
    const loaded = models.filter((model) => model.loaded).length;
    $("model-help").textContent = `${models.length} model${models.length === 1 ? "" : "s"}, ` +
      `${loaded} loaded. A model that is not loaded is loaded by the job first (its ` +
      "\"Preparing\" stage), which takes a while.";
    showModelFiles();
  }

  function showLoras(body) {
    loras = body && Array.isArray(body.loras) ? body.loras.filter((l) => l && l.name) : null;
    $("lora-picker").hidden = loras === null;
    syncLoras();
  }

  async function load() {
    const [samplers, modelList, loraList] = await Promise.all(
      ["v1/samplers", "v1/models", "v1/loras"].map(listed),
    );
    showSamplers(samplers);
    showModels(modelList);
    showLoras(loraList);
  }

  // -- the model and its LoRAs -------------------------------------------------------------

  function chosenModel() {
    return models ? models.find((model) => model.id === $("model").value) || null : null;
  }

  /** The LoRAs the chosen model can take: those of its architecture (all, when unknown). */
  function usableLoras() {
    const model = chosenModel();
    const architecture = model ? model.architecture : serverArchitecture;
    return (loras || []).filter((lora) => !architecture || lora.architecture === architecture);
  }

  function rows() {
    return [...$("lora-rows").children];
  }

  function rowName(row) {
    return row.querySelector("select").value;
  }

  function addRow(name, weight = 1) {
    rowCount += 1;
    const id = rowCount;
    const row = document.createElement("li");
    row.className = "lora-row";
    row.innerHTML = `
      <div class="field lora-name">
        <label for="lora-name-${id}"></label>
        <select id="lora-name-${id}" aria-describedby="loras-error"></select>
      </div>
      <div class="field lora-weight">
        <label for="lora-weight-${id}">Weight<span class="visually-hidden"></span></label>
        <input id="lora-weight-${id}" type="number" inputmode="decimal" min="-${MAX_WEIGHT}"
               max="${MAX_WEIGHT}" step="0.05" aria-describedby="loras-help loras-error">
      </div>
      <button type="button" class="secondary lora-remove">Remove</button>`;
    row.querySelector("input").value = String(weight);
    row.querySelector("select").dataset.wanted = name;
    row.querySelector("select").addEventListener("change", () => { clearError(); syncLoras(); });
    row.querySelector("input").addEventListener("input", clearError);
    row.querySelector("button").addEventListener("click", () => removeRow(row));
    $("lora-rows").append(row);
    return row;
  }

  function removeRow(row) {
    const index = rows().indexOf(row);
    row.remove();
    clearError();
    syncLoras();
    const left = rows();
    const next = left[Math.min(index, left.length - 1)];
    (next ? next.querySelector("select") : $("lora-add")).focus();
    hooks.say(`LoRA ${index + 1} was removed.`);
  }

  function onAdd() {
    const taken = new Set(rows().map(rowName));
    const free = usableLoras().find((lora) => !taken.has(lora.name));
    if (!free || rows().length >= MAX_LORAS) return;
    const row = addRow(free.name);
    clearError();
    syncLoras();
    row.querySelector("select").focus();
  }

  /** Rows, options and the Add button made to agree with the model and each other: each
   * LoRA once, only the model's architecture's, at most MAX_LORAS. */
  function syncLoras() {
    const usable = usableLoras();
    const names = new Set(usable.map((lora) => lora.name));
    const model = chosenModel();
    for (const row of rows()) {
      const select = row.querySelector("select");
      const name = select.dataset.wanted || select.value;
      if (!names.has(name)) {
        row.remove();
        const target = model ? `the model ${model.id}` : "this server's model";
        hooks.say(`The LoRA ${name} was taken off: it is not for ${target}.`);
      }
    }
    const kept = rows();
    const taken = kept.map((row) => row.querySelector("select").dataset.wanted || rowName(row));
    kept.forEach((row, index) => {
      const select = row.querySelector("select");
      const mine = taken[index];
      select.replaceChildren(...usable.map((lora) => {
        const option = new Option(lora.name, lora.name);
        option.disabled = lora.name !== mine && taken.includes(lora.name);
        return option;
      }));
      select.value = mine;
      delete select.dataset.wanted;
      row.querySelector("label").textContent = `LoRA ${index + 1}`;
      row.querySelector(".visually-hidden").textContent = ` of LoRA ${index + 1}`;
      row.querySelector("button").setAttribute("aria-label", `Remove LoRA ${index + 1}`);
    });
    const full = kept.length >= MAX_LORAS;
    $("lora-add").disabled = full || kept.length >= usable.length;
    $("loras-help").textContent = loraHelp(usable.length, full);
  }

  function loraHelp(usable, full) {
    if (!usable) return "No LoRA on this server is made for the chosen model.";
    const limit = full ? `: at most ${MAX_LORAS}` : `, up to ${MAX_LORAS}`;
    return `${usable} for this model${limit}. Weight from -${MAX_WEIGHT} to ${MAX_WEIGHT} ` +
      "(1: as trained, 0: none, below 0: the opposite).";
  }

  function clearError() {
    $("loras-error").textContent = "";
  }

  // -- what app.js asks --------------------------------------------------------------------

  function samplerNames() {
    return [...$("sampler").options].map((option) => option.value);
  }

  /** Check these fields by the API's rules: what differs from the defaults goes in BODY, the
   * rules broken in ERRORS. */
  function check(body, errors) {
    const sampler = $("sampler").value;
    const samplers = samplerNames();
    if (!samplers.includes(sampler)) errors.sampler = `sampler must be one of ${samplers.join(", ")}`;
    body.sampler = sampler;
    const model = chosenModel();
    if (model && !model.default) body.model = model.id;
    checkLoras(body, errors);
    const scheduler = $("scheduler").value;
    if (scheduler !== DEFAULT_SCHEDULER) body.scheduler = scheduler;
    const clipText = $("clipSkip").value.trim();
    const clipSkip = /^\d+$/.test(clipText) ? Number(clipText) : null;
    if (clipSkip === null || clipSkip < 1 || clipSkip > 12) {
      errors.clipSkip = "clipSkip must be an integer from 1 to 12";
    } else if (clipSkip !== 1) {
      body.clipSkip = clipSkip;
    }
  }

  function checkLoras(body, errors) {
    const chosen = [];
    rows().forEach((row, index) => {
      const text = row.querySelector("input").value.trim();
      const weight = text === "" ? NaN : Number(text);
      if (!Number.isFinite(weight) || Math.abs(weight) > MAX_WEIGHT) {
        errors.loras = errors.loras || `loras: the weight of LoRA ${index + 1} must be a ` +
          `number from -${MAX_WEIGHT} to ${MAX_WEIGHT}`;
      }
      chosen.push({ name: rowName(row), weight });
    });
    if (chosen.length) body.loras = chosen;
  }

  /** Where the focus goes to show a field's error. */
  function focusTarget(field) {
    if (field !== "loras") return null;
    const first = rows()[0];
    if (first) return first.querySelector("select");
    return $("lora-add").disabled ? $("model") : $("lora-add");
  }

  /** Put a recipe's model, LoRAs, scheduler and clip skip in the form; returns what could
   * not be (a model or LoRA this server does not list). */
  function restore(recipe) {
    const missing = [];
    if (models && recipe.model) {
      const known = models.find((model) => model.id === recipe.model);
      if (known) $("model").value = known.id;
      else missing.push(`the model ${recipe.model}`);
    }
    for (const row of rows()) row.remove();
    const usable = new Set(usableLoras().map((lora) => lora.name));
    for (const lora of Array.isArray(recipe.loras) ? recipe.loras.slice(0, MAX_LORAS) : []) {
      if (usable.has(lora.name)) addRow(lora.name, lora.weight);
      else missing.push(`the LoRA ${lora.name}`);
    }
    clearError();
    syncLoras();
    const scheduler = recipe.scheduler || DEFAULT_SCHEDULER;
    if ([...$("scheduler").options].some((option) => option.value === scheduler)) {
      $("scheduler").value = scheduler;
    } else {
      missing.push(`the scheduler ${scheduler}`);
    }
    $("clipSkip").value = String(recipe.clipSkip || 1);
    return missing;
  }

  function setUp(given) {
    hooks = given;
    $("lora-add").addEventListener("click", onAdd);
    $("model").addEventListener("change", () => { syncLoras(); showModelFiles(); });
    return load();
  }

  return {
    setUp,
    check,
    restore,
    focusTarget,
    useServerArchitecture: (architecture) => { serverArchitecture = architecture; syncLoras(); },
    hasSampler: (name) => samplerNames().includes(name),
    MODEL_FIELDS: ["model", "loras"],
    SAMPLING_FIELDS: ["sampler", "scheduler", "clipSkip"],
  };
})();
