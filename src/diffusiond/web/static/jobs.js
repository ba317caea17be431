// diffusiond's web page, the recent jobs: the list endpoint's newest, each a button that opens
// the job (app.js answers through the hook given to setUp).
"use strict";

window.DiffusiondJobs = (() => {
  const { api, errorOf } = window.DiffusiondHttp;
  const $ = (id) => document.getElementById(id);
  let hooks = { open: () => {} };

  /** The 20 newest jobs, from the list endpoint. */
  async function refresh() {
    let response;
    try {
      response = await api("v1/images/generations?limit=20");
    } catch (error) {
      $("jobs-empty").textContent = error.message;
      $("jobs-empty").hidden = false;
      return;
    }
    if (!response.ok) {
      $("jobs-empty").textContent = (await errorOf(response)).message;
      $("jobs-empty").hidden = false;
      return;
    }
    const { generations } = await response.json();
    const list = $("jobs");
    list.replaceChildren(...generations.map(jobItem));
    $("jobs-empty").textContent = "None yet.";
    $("jobs-empty").hidden = generations.length > 0;
  }

  function jobItem(job) {
    const item = document.createElement("li");
    item.dataset.id = job.id;
    const button = document.createElement("button");
    button.type = "button";
    button.className = "job";
    const when = new Date(job.createdAt).toLocaleTimeString();
    const badge = document.createElement("span");
    badge.className = `badge badge-${job.status}`;
    badge.textContent = job.status.replace("_", " ");
    const id = document.createElement("span");
    id.className = "job-id";
    id.textContent = job.id;
    const time = document.createElement("span");
    time.className = "job-time";
    time.textContent = when;
    button.append(badge, time, id);
    button.setAttribute("aria-label", `${job.status.replace("_", " ")} job from ${when}: ${
      job.status === "complete" ? "show its images" : "show its state"}`);
    button.addEventListener("click", () => hooks.open(job.id));
    item.append(button);
    return item;
  }

  function setUp(given) {
    hooks = given;
    $("jobs-refresh").addEventListener("click", refresh);
  }

  return { setUp, refresh };
})();
