// diffusiond's web page, the input image and its mask (image-to-image and inpainting).
// app.js owns the form; this file owns the #edit fieldset and answers through
// window.DiffusiondEdit. The mask is painted on a canvas of the input image's own size (the
// image is its background), whatever size it is shown at, and sent as a black-and-white PNG.
"use strict";

window.DiffusiondEdit = (() => {
  const MASK_COLOUR = "#ff1f5a"; // shown at half opacity over the image (see style.css)
  const MAX_VIEW_HEIGHT_REM = 28; // a tall image is shown narrower, not taller than this

  const $ = (id) => document.getElementById(id);
  let input = null; // {base64, width, height, name, url} of the input image, or null
  let stroke = null; // {pointerId, x, y, radius}: the last point of the stroke being painted
  let hooks = { changed: () => {}, say: () => {} };

  // -- reading an image ------------------------------------------------------------------

  /** "png", "jpeg" or "webp" from the file's first bytes (a dropped file may have no type). */
  function formatOf(head) {
    const ascii = (from, to) => String.fromCharCode(...head.subarray(from, to));
    if (head[0] === 0x89 && ascii(1, 4) === "PNG") return "png";
    if (head[0] === 0xff && head[1] === 0xd8 && head[2] === 0xff) return "jpeg";
    if (ascii(0, 4) === "RIFF" && ascii(8, 12) === "WEBP") return "webp";
    return null;
  }

  function base64Of(blob) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(String(reader.result).slice(String(reader.result).indexOf(",") + 1));
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(blob);
    });
  }

  /** The image as the API takes it (its own bytes, in base64) and its size, or an error text. */
  async function readImage(blob) {
    const format = formatOf(new Uint8Array(await blob.slice(0, 12).arrayBuffer()));
    if (!format) return { error: "initImage must be a PNG, JPEG or WebP image" };
    const url = URL.createObjectURL(blob);
    const image = new Image();
    image.src = url;
    try {
      await image.decode();
    } catch {
      URL.revokeObjectURL(url);
      return { error: `initImage could not be read as a ${format.toUpperCase()} image` };
    }
    return { url, width: image.naturalWidth, height: image.naturalHeight, base64: await base64Of(blob) };
  }

  // -- the input image -------------------------------------------------------------------

  /** Make BLOB the input image (a picked or dropped file, or a result); true when it is. */
  async function useImage(blob, name) {
    setError("initImage", "");
    const read = await readImage(blob);
    if (read.error) {
      setError("initImage", read.error);
      hooks.say(`${name} cannot be the input image: ${read.error}.`);
      return false;
    }
    if (input) URL.revokeObjectURL(input.url);
    input = { ...read, name };
    const canvas = $("mask-canvas");
    canvas.width = input.width; // resizing a canvas also clears it: a new image, a new mask
    canvas.height = input.height;
    const view = $("mask-view");
    view.style.backgroundImage = `url("${input.url}")`;
    view.style.maxWidth = `calc(${MAX_VIEW_HEIGHT_REM}rem * ${input.width / input.height})`;
    $("input-caption").textContent = `${name} · ${input.width} × ${input.height}`;
    canvas.setAttribute("aria-label",
      `The input image, ${input.width} × ${input.height}, with the mask painted on it`);
    $("editor").hidden = false;
    $("drop-label").textContent = "Replace the input image";
    showMaskState();
    hooks.changed({ width: input.width, height: input.height });
    return true;
  }

  function removeImage() {
    if (!input) return;
    URL.revokeObjectURL(input.url);
    input = null;
    $("initImage").value = "";
    $("editor").hidden = true;
    $("mask-view").style.backgroundImage = "";
    $("drop-label").textContent = "Pick an input image";
    for (const field of ["initImage", "strength", "maskImage", "maskBlur"]) setError(field, "");
    hooks.changed(null);
    hooks.say("The input image was removed: Generate draws from the prompt alone.");
    $("initImage").focus();
  }

  function setError(field, message) {
    $(`${field}-error`).textContent = message;
    const control = $(field);
    if (!control) return;
    if (message) control.setAttribute("aria-invalid", "true");
    else control.removeAttribute("aria-invalid");
  }

  // -- the mask: painted with the pointer --------------------------------------------------

  function erasing() {
    return $("tool-eraser").checked;
  }

  /** The pointer's place on the canvas in the image's pixels, and the brush's radius there. */
  function pointOf(event) {
    const canvas = $("mask-canvas");
    const box = canvas.getBoundingClientRect();
    const scale = canvas.width / box.width; // the brush size is in pixels on screen
    return {
      pointerId: event.pointerId,
      x: (event.clientX - box.left) * scale,
      y: (event.clientY - box.top) * (canvas.height / box.height),
      radius: (Number($("brush-size").value) / 2) * scale,
    };
  }

  function brush() {
    const context = $("mask-canvas").getContext("2d", { willReadFrequently: true });
    context.globalCompositeOperation = erasing() ? "destination-out" : "source-over";
    context.fillStyle = MASK_COLOUR;
    context.strokeStyle = MASK_COLOUR;
    context.lineCap = "round";
    context.lineJoin = "round";
    return context;
  }

  function paintDot(point) {
    const context = brush();
    context.beginPath();
    context.arc(point.x, point.y, point.radius, 0, 2 * Math.PI);
    context.fill();
  }

  function paintLine(from, to) {
    const context = brush();
    context.lineWidth = to.radius * 2;
    context.beginPath();
    context.moveTo(from.x, from.y);
    context.lineTo(to.x, to.y);
    context.stroke();
  }

  function onPointerDown(event) {
    if (!input || (event.pointerType === "mouse" && event.button !== 0)) return;
    event.preventDefault();
    $("mask-canvas").setPointerCapture(event.pointerId);
    stroke = pointOf(event);
    paintDot(stroke);
  }

  /** The brush's outline under the pointer: what a stroke will cover. */
  function showBrush(event) {
    const outline = $("brush-outline");
    const box = $("mask-canvas").getBoundingClientRect();
    const size = Number($("brush-size").value);
    outline.style.width = `${size}px`;
    outline.style.height = `${size}px`;
    outline.style.left = `${event.clientX - box.left - size / 2}px`;
    outline.style.top = `${event.clientY - box.top - size / 2}px`;
    outline.classList.toggle("erasing", erasing());
    outline.hidden = false;
  }

  function onPointerMove(event) {
    if (event.pointerType !== "touch") showBrush(event);
    if (!stroke || event.pointerId !== stroke.pointerId) return;
    const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
    for (const each of events.length ? events : [event]) {
      const point = pointOf(each);
      paintLine(stroke, point);
      stroke = point;
    }
  }

  function onPointerEnd(event) {
    if (!stroke || event.pointerId !== stroke.pointerId) return;
    stroke = null;
    showMaskState();
  }

  function clearMask() {
    const canvas = $("mask-canvas");
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
    setError("maskImage", "");
    showMaskState();
    hooks.say("The mask was cleared: the whole input image is redrawn.");
  }

  /** The painted pixels: alpha of each, read back from the canvas. */
  function maskAlpha() {
    const canvas = $("mask-canvas");
    return canvas.getContext("2d", { willReadFrequently: true })
      .getImageData(0, 0, canvas.width, canvas.height).data;
  }

  function isPainted() {
    const pixels = maskAlpha();
    for (let i = 3; i < pixels.length; i += 4) if (pixels[i] >= 128) return true;
    return false;
  }

  function showMaskState() {
    $("mask-state").textContent = isPainted()
      ? "Mask painted: only the painted parts are redrawn; the rest is kept as it is."
      : "No mask: the whole image is redrawn, as much as Strength says.";
  }

  /** The mask as the API takes it: base64 PNG, the input's size, white = redraw; null if empty. */
  async function maskBase64() {
    const pixels = maskAlpha();
    const { width, height } = $("mask-canvas");
    const mask = new ImageData(width, height);
    let painted = false;
    for (let i = 0; i < pixels.length; i += 4) {
      const value = pixels[i + 3] >= 128 ? 255 : 0; // the brush's soft edge, made black or white
      painted = painted || value === 255;
      mask.data[i] = value;
      mask.data[i + 1] = value;
      mask.data[i + 2] = value;
      mask.data[i + 3] = 255;
    }
    if (!painted) return null;
    const out = document.createElement("canvas");
    out.width = width;
    out.height = height;
    out.getContext("2d").putImageData(mask, 0, 0);
    const blob = await new Promise((resolve) => out.toBlob(resolve, "image/png"));
    return base64Of(blob);
  }

  // -- what app.js asks --------------------------------------------------------------------

  /** Check the edit fields by the API's rules; put the sync ones in BODY, the rules broken in ERRORS. */
  function check(body, errors) {
    if (!input) return;
    body.initImage = input.base64;
    const strength = Number($("strength").value);
    if (!Number.isFinite(strength) || strength < 0 || strength > 1) {
      errors.strength = "strength must be a number from 0 to 1";
    }
    body.strength = strength;
    const blurText = $("maskBlur").value.trim();
    const blur = /^\d+$/.test(blurText) ? Number(blurText) : null;
    if (blur === null || blur > 64) errors.maskBlur = "maskBlur must be an integer from 0 to 64";
    body.maskBlur = blur;
  }

  /** Add the mask (drawn at send time) to BODY; without one, maskBlur is left out too. */
  async function addMask(body) {
    if (!input) return;
    const mask = await maskBase64();
    if (mask) body.maskImage = mask;
    else delete body.maskBlur;
  }

  function showStrength() {
    $("strength-value").value = Number($("strength").value).toFixed(2);
  }

  function setUp(given) {
    hooks = given;
    const drop = $("drop-zone"); // highlighted; the whole fieldset takes the drop
    const target = $("edit");
    $("initImage").addEventListener("change", () => {
      const file = $("initImage").files[0];
      if (file) useImage(file, file.name);
    });
    target.addEventListener("dragover", (event) => {
      event.preventDefault(); // without it the browser opens the dropped file itself
      event.dataTransfer.dropEffect = "copy";
      drop.classList.add("dragging");
    });
    target.addEventListener("dragleave", (event) => {
      if (!target.contains(event.relatedTarget)) drop.classList.remove("dragging");
    });
    target.addEventListener("drop", (event) => {
      event.preventDefault();
      drop.classList.remove("dragging");
      const file = event.dataTransfer.files[0];
      if (file) useImage(file, file.name);
    });
    const canvas = $("mask-canvas");
    canvas.addEventListener("pointerdown", onPointerDown);
    canvas.addEventListener("pointermove", onPointerMove);
    canvas.addEventListener("pointerup", onPointerEnd);
    canvas.addEventListener("pointercancel", onPointerEnd);
    canvas.addEventListener("pointerleave", () => { $("brush-outline").hidden = true; });
    $("mask-clear").addEventListener("click", clearMask);
    $("input-remove").addEventListener("click", removeImage);
    $("brush-size").addEventListener("input", () => {
      $("brush-size-value").value = $("brush-size").value;
    });
    $("strength").addEventListener("input", showStrength);
    showStrength();
  }

  return {
    setUp,
    check,
    addMask,
    useImage,
    hasInput: () => input !== null,
    inputSize: () => (input ? { width: input.width, height: input.height } : null),
    FIELDS: ["initImage", "strength", "maskImage", "maskBlur"],
  };
})();
