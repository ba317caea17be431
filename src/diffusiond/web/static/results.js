// diffusiond's web page, the result list: each image with what it was made with (read from
// the recipe in its PNG), its full-size viewer, its download and the buttons that take it
// back into the form (app.js answers those through the hooks given to setUp).
"use strict";

window.DiffusiondResults = (() => {
  const MAX_GALLERY = 40;
  const $ = (id) => document.getElementById(id);
  let hooks = { reuseSeed: () => {}, useAsInput: () => {}, useSettings: () => {} };

  function pngBytes(base64) {
    const text = atob(base64);
    const bytes = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i += 1) bytes[i] = text.charCodeAt(i);
    return bytes;
  }

  /** The recipe diffusiond writes in each PNG (an iTXt chunk named "diffusiond"), or null. */
  function pngRecipe(bytes) {
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const latin1 = (part) => String.fromCharCode(...part);
    let pos = 8;
    while (pos + 12 <= bytes.length) {
      const length = view.getUint32(pos);
      const type = latin1(bytes.subarray(pos + 4, pos + 8));
      if (type === "IEND") break;
      const data = bytes.subarray(pos + 8, pos + 8 + length);
      const nul = data.indexOf(0);
      if ((type === "iTXt" || type === "tEXt") && nul > 0 && latin1(data.subarray(0, nul)) === "diffusiond") {
        let text;
        if (type === "tEXt") {
          text = latin1(data.subarray(nul + 1));
        } else {
          if (data[nul + 1] !== 0) return null; // compressed: not what diffusiond writes
          let at = data.indexOf(0, nul + 3) + 1; // after the language tag
          at = data.indexOf(0, at) + 1; // after the translated keyword
          text = new TextDecoder().decode(data.subarray(at));
        }
        try {
          return JSON.parse(text);
        } catch {
          return null;
        }
      }
      pos += 12 + length;
    }
    return null;
  }

  /** Show the images of a complete JOB first in the list; REQUEST is what this page sent. */
  function add(job, request) {
    const gallery = $("gallery");
    const images = job.result.images;
    const items = images.map((image, index) => {
      const bytes = pngBytes(image.image);
      const recipe = pngRecipe(bytes) || {};
      const sampler = recipe.sampler || (request && request.sampler) || "";
      const blob = new Blob([bytes], { type: "image/png" });
      return resultItem({ jobId: job.id, index, total: images.length, image, sampler, blob, recipe });
    });
    gallery.prepend(...items);
    while (gallery.children.length > MAX_GALLERY) {
      const last = gallery.lastElementChild;
      URL.revokeObjectURL(last.dataset.url);
      last.remove();
    }
    $("gallery-empty").hidden = gallery.children.length > 0;
  }

  /** "model m · LoRAs a 0.8, b -0.5 · karras · clip skip 2": what is not in the first line. */
  function madeWith(recipe) {
    const parts = [];
    if (recipe.model) parts.push(`model ${recipe.model}`);
    const loras = Array.isArray(recipe.loras) ? recipe.loras : [];
    if (loras.length) {
      const named = loras.map((lora) => `${lora.name} ${lora.weight}`).join(", ");
      parts.push(`${loras.length === 1 ? "LoRA" : "LoRAs"} ${named}`);
    }
    if (recipe.scheduler && recipe.scheduler !== "discrete") parts.push(recipe.scheduler);
    if (recipe.clipSkip && recipe.clipSkip !== 1) parts.push(`clip skip ${recipe.clipSkip}`);
    return parts.join(" · ");
  }

  function resultItem({ jobId, index, total, image, sampler, blob, recipe }) {
    const url = URL.createObjectURL(blob);
    const item = document.createElement("li");
    item.className = "result";
    item.dataset.job = jobId;
    item.dataset.seed = String(image.seed);
    item.dataset.url = url;
    const name = `image ${index + 1} of ${total}, seed ${image.seed}`;

    const view = document.createElement("button");
    view.type = "button";
    view.className = "thumb";
    view.setAttribute("aria-label", `View ${name} at full size`);
    const img = document.createElement("img");
    img.src = url;
    img.alt = `Generated ${name}`;
    img.width = image.width;
    img.height = image.height;
    view.append(img);
    view.addEventListener("click", () => openViewer(url, name, image));

    const meta = document.createElement("p");
    meta.className = "meta";
    const edited = ["img2img", "inpaint"].includes(recipe.mode) // an edit: how it was made
      ? ` · ${recipe.mode}, strength ${recipe.strength}` : "";
    meta.textContent =
      `seed ${image.seed} · ${image.width}×${image.height}${sampler ? ` · ${sampler}` : ""}${edited}`;
    item.append(view, meta);
    const made = madeWith(recipe);
    if (made) {
      const line = document.createElement("p");
      line.className = "made-with";
      line.textContent = made;
      item.append(line);
    }
    item.append(resultActions({ jobId, index, image, blob, recipe, url, name }));
    if (recipe.prompt) item.title = recipe.prompt;
    return item;
  }

  function resultActions({ jobId, index, image, blob, recipe, url, name }) {
    const actions = document.createElement("div");
    actions.className = "result-actions";
    const download = document.createElement("a");
    download.className = "download";
    download.href = url;
    download.download = `${jobId}-${index + 1}-seed${image.seed}.png`;
    download.textContent = "Download PNG";
    download.setAttribute("aria-label", `Download ${name} as PNG`);
    actions.append(
      download,
      actionButton("Reuse seed", `Reuse seed ${image.seed} in the form`,
        () => hooks.reuseSeed(image.seed)),
      actionButton("Use as input", `Use ${name} as the input image`,
        () => hooks.useAsInput(blob, `${jobId}-${index + 1}.png`, name)),
    );
    if (recipe.prompt !== undefined) { // a recipe to put back in the form
      actions.append(actionButton("Use these settings", `Use the settings of ${name} in the form`,
        () => hooks.useSettings(recipe, name)));
    }
    return actions;
  }

  function actionButton(text, label, onClick) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "reuse";
    button.textContent = text;
    button.setAttribute("aria-label", label);
    button.addEventListener("click", onClick);
    return button;
  }

  function openViewer(url, name, image) {
    $("viewer-title").textContent = `Generated ${name} (${image.width}×${image.height})`;
    const img = $("viewer-image");
    img.src = url;
    img.alt = `Generated ${name}`;
    $("viewer").showModal();
    $("viewer-close").focus();
  }

  function setUp(given) {
    hooks = given;
    $("viewer-close").addEventListener("click", () => $("viewer").close());
    $("viewer").addEventListener("click", (event) => {
      if (event.target === $("viewer")) $("viewer").close(); // a click on the backdrop
    });
  }

  return { setUp, add };
})();
