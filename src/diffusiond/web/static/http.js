// diffusiond's web page, its way to the API: the API key (asked for on the first 401, kept in
// localStorage) and the errors in the API's JSON envelope. app.js, choices.js and the rest
// call through window.DiffusiondHttp.
"use strict";

window.DiffusiondHttp = (() => {
  const KEY_STORAGE = "diffusiond.apiKey";
  const $ = (id) => document.getElementById(id);

  class ApiError extends Error {
    constructor(message, { code = "", status = 0, details = null, suggestion = "",
      retryAfter = null } = {}) {
      super(message);
      this.code = code;
      this.status = status;
      this.details = details;
      this.suggestion = suggestion;
      this.retryAfter = retryAfter;
    }
  }

  function storedKey() {
    try {
      return localStorage.getItem(KEY_STORAGE) || "";
    } catch {
      return "";
    }
  }

  function showKeyButton() {
    $("key-button").hidden = storedKey() === "";
  }

  let keyAnswer = null; // the pending dialog's resolve function
  let keyPromise = null; // one dialog for every request that met a 401 at the same time

  function askForKey(refused) {
    if (keyPromise) return keyPromise;
    keyPromise = new Promise((resolve) => {
      keyAnswer = resolve;
      $("key-message").textContent = refused
        ? "The server refused the stored API key. Enter the right one (its IMAGE_API_KEY)."
        : "This server asks for an API key (its IMAGE_API_KEY). It is kept in this " +
          "browser's storage for this page.";
      $("key-input").value = "";
      $("key-dialog").showModal();
      $("key-input").focus();
    }).finally(() => {
      keyPromise = null;
      keyAnswer = null;
    });
    return keyPromise;
  }

  function answerKey(saved) {
    const dialog = $("key-dialog");
    if (dialog.open) dialog.close();
    if (keyAnswer) keyAnswer(saved);
    showKeyButton();
  }

  /** The key dialog and the "Forget API key" button; SAY tells the user what happened. */
  function setUp(say) {
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("key-input").value.trim();
      if (!key) {
        $("key-input").focus();
        return;
      }
      try {
        localStorage.setItem(KEY_STORAGE, key);
      } catch {
        // storage is off: the key cannot be kept, the request goes on failing with 401
      }
      answerKey(true);
    });
    $("key-cancel").addEventListener("click", () => answerKey(false));
    $("key-dialog").addEventListener("cancel", () => answerKey(false)); // Escape
    $("key-button").addEventListener("click", () => {
      localStorage.removeItem(KEY_STORAGE);
      showKeyButton();
      say("The API key was removed from this browser.");
    });
    showKeyButton();
  }

  /** fetch with the stored key; on 401, ask for the key (once) and try again. */
  async function api(path, options = {}) {
    for (;;) {
      const headers = new Headers(options.headers || {});
      const key = storedKey();
      if (key) headers.set("Authorization", `Bearer ${key}`);
      const response = await fetch(path, { cache: "no-store", ...options, headers });
      if (response.status !== 401) return response;
      if (!(await askForKey(key !== ""))) {
        throw new ApiError("This server needs an API key: nothing was sent without it.", {
          code: "UNAUTHORIZED", status: 401,
        });
      }
    }
  }

  async function errorOf(response) {
    let body = null;
    try {
      body = await response.json();
    } catch {
      // not JSON: a proxy's page, say
    }
    const error = (body && body.error) || {};
    return new ApiError(error.message || `the server answered HTTP ${response.status}`, {
      code: error.code || "",
      status: response.status,
      details: error.details || null,
      suggestion: error.suggestion || "",
      retryAfter: response.headers.get("Retry-After"),
    });
  }

  return { ApiError, api, errorOf, storedKey, setUp };
})();
