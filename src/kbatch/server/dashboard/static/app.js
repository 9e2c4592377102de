// kbatch dashboard. Every value from the server is shown with textContent: never markup.
"use strict";
(function () {
  const TERMINAL = new Set(["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"]);
  const STATES = ["PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"];
  const PAGE = 500;
  const $ = (id) => document.getElementById(id);
  const jobs = new Map();
  let me = null, csrf = "", tab = "active", shown = PAGE, source = null, loading = false;
  let buffered = [], renderQueued = false, currentJob = null, logAborts = [];

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function flash(message, ok) {
    const f = $("flash");
    f.textContent = message;
    f.className = ok ? "flash ok" : "flash";
    f.hidden = false;
    clearTimeout(flash.timer);
    flash.timer = setTimeout(() => { f.hidden = true; }, 8000);
  }
  // One formatter for every date: toLocaleString() makes a new one per call (slow for 10,000 rows).
  const dateFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "short", timeStyle: "medium" });
  function when(value) {
    if (!value) return "";
    const d = new Date(value);
    return isNaN(d) ? "" : dateFormat.format(d);
  }
  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "";
    seconds = Math.max(0, Math.floor(seconds));
    const d = Math.floor(seconds / 86400), h = Math.floor(seconds % 86400 / 3600);
    const m = Math.floor(seconds % 3600 / 60), s = seconds % 60;
    const hms = [h, m, s].map((n) => String(n).padStart(2, "0")).join(":");
    return d ? d + "-" + hms : hms;
  }
  function bytes(n) {
    if (!n) return "";
    const units = ["B", "K", "M", "G", "T", "P"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1 && n % 1024 === 0) { n /= 1024; i++; }
    return n + units[i];
  }
  function used(job) {
    if (!job.started) return 0;
    const end = job.finished ? new Date(job.finished) : new Date();
    return (end - new Date(job.started)) / 1000;
  }
  function parseMemory(text) {
    text = text.trim();
    if (!text) return null;
    const m = /^(\d+(?:\.\d+)?)\s*([KMGTP]?)i?B?$/i.exec(text);
    if (!m) throw new Error("memory must look like 512M or 4G");
    const pow = { "": 2, K: 1, M: 2, G: 3, T: 4, P: 5 }[m[2].toUpperCase()];
    return Math.round(parseFloat(m[1]) * Math.pow(1024, pow));
  }
  function parseTime(text) {
    text = text.trim();
    if (!text) return null;
    const m = /^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$/.exec(text);
    if (!m) throw new Error("time must be minutes, MM:SS, HH:MM:SS or D-HH:MM:SS");
    const days = +(m[1] || 0), a = +m[2], b = m[3], c = m[4];
    let s;
    if (c !== undefined) s = a * 3600 + +b * 60 + +c;
    else if (b !== undefined) s = m[1] ? a * 3600 + +b * 60 : a * 60 + +b;
    else s = m[1] ? a * 3600 : a * 60;
    return days * 86400 + s;
  }

  async function api(method, path, body, extra) {
    const headers = Object.assign({ Accept: "application/json" }, extra || {});
    if (method !== "GET") headers["X-Kbatch-CSRF"] = csrf;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const r = await fetch(path, { method, headers, credentials: "same-origin",
      body: body === undefined ? undefined : JSON.stringify(body) });
    const data = r.status === 204 ? null : await r.json().catch(() => null);
    if (!r.ok) {
      const err = new Error(data && data.error ? data.error.message : "HTTP " + r.status);
      err.status = r.status;
      err.code = data && data.error ? data.error.code : "";
      throw err;
    }
    return data;
  }

  // -- the live list ---------------------------------------------------------------------
  function allUsers() { return me && me.admin && $("all-users").checked; }

  function connect() {
    if (source) source.close();
    source = new EventSource("dashboard/events" + (allUsers() ? "?all_users=true" : ""));
    source.onopen = () => { $("live").textContent = "live"; $("live").className = "live on"; };
    source.onerror = () => { $("live").textContent = "reconnecting…"; $("live").className = "live"; };
    source.onmessage = (message) => {
      let event;
      try { event = JSON.parse(message.data); } catch (e) { return; }
      if (event.type === "resync") { relist(); return; }
      if (event.job) { if (loading) buffered.push(event.job); else apply(event.job); }
    };
  }
  async function relist() {
    loading = true;
    buffered = [];
    const fresh = new Map();
    try {
      let after = null;
      do {
        const q = new URLSearchParams({ all: "true", limit: "10000" });
        if (allUsers()) q.set("all_users", "true");
        if (after) q.set("after", after);
        const page = await api("GET", "api/v1/jobs?" + q);
        for (const job of page.jobs) fresh.set(job.id, job);
        after = page.next || null;
      } while (after);
    } catch (e) {
      flash("Could not list jobs: " + e.message);
    }
    jobs.clear();
    for (const [id, job] of fresh) jobs.set(id, job);
    loading = false;
    for (const job of buffered) apply(job);
    buffered = [];
    queueRender();
  }
  function apply(job) {
    // An array's row for its tasks not started yet goes once they all have.
    if (job.array_tasks === "" && job.array_task_id === null) { jobs.delete(job.id); queueRender(); return; }
    jobs.set(job.id, job);
    if (currentJob === job.id && !job.array_tasks) showJobFields(job);
    else if (currentJob && job.array_job_id && currentJob.split("_")[0] === job.array_job_id) refreshCurrent();
    queueRender();
  }
  // An answer to our own request (an action, a job's first read) may be older than what
  // the event stream already said (the job ended meanwhile): never show a job going back.
  const rank = (job) => (TERMINAL.has(job.state) ? 2 : job.state === "RUNNING" ? 1 : 0);
  function merge(job) {
    const known = jobs.get(job.id);
    if (known && rank(known) > rank(job)) return known;
    apply(job);
    return job;
  }
  function queueRender() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(() => { renderQueued = false; render(); });
  }
  // -- arrays: one row each, its counts per state, expandable to its tasks ----------
  const expanded = new Set();
  // How many indexes "1,3-5,10-20:2" names (Slurm's compact form).
  function countIndexes(text) {
    let n = 0;
    for (const part of String(text || "").split(",")) {
      const m = /^(\d+)(?:-(\d+)(?::(\d+))?)?$/.exec(part.trim());
      if (!m) continue;
      const a = +m[1], b = m[2] === undefined ? a : +m[2], step = +(m[3] || 1);
      n += Math.floor((b - a) / step) + 1;
    }
    return n;
  }
  function aggregate(counts) {
    if (counts.RUNNING) return "RUNNING";
    if (counts.PENDING) return "PENDING";
    for (const s of ["FAILED", "OUT_OF_MEMORY", "TIMEOUT", "NODE_FAIL", "CANCELLED", "COMPLETED"]) {
      if (counts[s]) return s;
    }
    return "PENDING";
  }
  function countsText(counts) {
    return STATES.filter((s) => counts[s]).map((s) => counts[s] + " " + s).join(", ");
  }
  // The rows of the list: jobs as they are, each array as one summary row.
  function listRows() {
    const rows = [], arrays = new Map();
    for (const job of jobs.values()) {
      if (!job.array_job_id) { rows.push(job); continue; }
      let a = arrays.get(job.array_job_id);
      if (!a) { a = { members: [], counts: {} }; arrays.set(job.array_job_id, a); }
      a.members.push(job);
      const n = job.array_task_id === null && job.array_tasks ? countIndexes(job.array_tasks) : 1;
      a.counts[job.state] = (a.counts[job.state] || 0) + n;
    }
    for (const [id, a] of arrays) {
      const first = a.members.reduce((x, y) => (x.submitted <= y.submitted ? x : y));
      const state = aggregate(a.counts);
      const waiting = a.members.find((m) => m.array_task_id === null && m.state === "PENDING");
      const ended = a.members.map((m) => m.finished).filter(Boolean).sort();
      const codes = a.members.map((m) => m.exit_code).filter((c) => c !== null && c !== undefined);
      rows.push(Object.assign({}, first, {
        id, state, summary: a, array_tasks: null, array_task_id: null,
        reason: waiting ? waiting.reason : null,
        started: a.members.map((m) => m.started).filter(Boolean).sort()[0] || null,
        finished: TERMINAL.has(state) ? ended[ended.length - 1] || null : null,
        exit_code: TERMINAL.has(state) && codes.length ? Math.max.apply(null, codes) : null,
      }));
    }
    return rows;
  }
  function memberId(job) {
    return job.array_task_id === null && job.array_tasks ? job.array_job_id + "_[" + job.array_tasks + "]" : job.id;
  }
  function byIndex(a, b) {
    const ia = a.array_task_id === null ? countIndexes("0-" + String(a.array_tasks).split(/[-,:]/)[0]) - 1 : a.array_task_id;
    const ib = b.array_task_id === null ? countIndexes("0-" + String(b.array_tasks).split(/[-,:]/)[0]) - 1 : b.array_task_id;
    return ia - ib;
  }

  function matches(job, stateFilter, text, user) {
    if (stateFilter && job.state !== stateFilter) return false;
    if (user && !job.user.toLowerCase().includes(user)) return false;
    if (!text) return true;
    return (job.id + " " + job.name + " " + (job.reason || "") + " " + job.user + " " + (job.comment || ""))
      .toLowerCase().includes(text);
  }
  function order(a, b) {
    if (a.submitted !== b.submitted) return a.submitted < b.submitted ? 1 : -1;
    return b.id.localeCompare(a.id, undefined, { numeric: true });
  }
  function row(job, member) {
    const tr = document.createElement("tr");
    tr.tabIndex = 0;
    const id = member ? memberId(job) : job.id;
    tr.dataset.id = id;
    const link = el("a", id);
    link.href = "jobs/" + encodeURIComponent(id);
    const first = el("td");
    if (job.summary) {
      const open = expanded.has(job.id);
      const toggle = el("button", open ? "▾" : "▸", "expand");
      toggle.type = "button";
      toggle.setAttribute("aria-expanded", String(open));
      toggle.setAttribute("aria-label", (open ? "Hide" : "Show") + " the tasks of array " + job.id);
      toggle.dataset.array = job.id;
      first.appendChild(toggle);
      tr.classList.add("array");
    }
    if (member) tr.classList.add("task");
    first.appendChild(link);
    tr.appendChild(first);
    tr.appendChild(el("td", job.user, "col-user"));
    const name = el("td", job.name, "name"); name.title = job.name; tr.appendChild(name);
    const st = el("td"); st.appendChild(el("span", job.state, "state state-" + job.state));
    if (job.summary) st.appendChild(el("div", countsText(job.summary.counts), "counts"));
    else if (member && job.array_task_id === null && job.array_tasks) st.appendChild(el("div", countIndexes(job.array_tasks) + " tasks", "counts"));
    tr.appendChild(st);
    tr.appendChild(el("td", job.reason && job.reason !== "None" ? job.reason : ""));
    tr.appendChild(el("td", duration(used(job)) + (job.time_limit ? " / " + duration(job.time_limit) : "")));
    tr.appendChild(el("td", job.cpus));
    tr.appendChild(el("td", bytes(job.memory)));
    tr.appendChild(el("td", job.gpus || ""));
    tr.appendChild(el("td", job.exit_code === null || job.exit_code === undefined ? "" : job.exit_code));
    tr.appendChild(el("td", when(job.submitted)));
    tr.appendChild(el("td", when(job.started)));
    tr.appendChild(el("td", when(job.finished)));
    return tr;
  }
  function render() {
    if ($("list-view").hidden) return;
    const stateFilter = $("filter-state").value;
    const text = $("filter-text").value.trim().toLowerCase();
    const user = allUsers() ? $("filter-user").value.trim().toLowerCase() : "";
    let active = 0, finished = 0;
    const list = [];
    for (const job of listRows()) {
      const done = TERMINAL.has(job.state);
      if (done) finished++; else active++;
      if ((tab === "finished") === done && matches(job, stateFilter, text, user)) list.push(job);
    }
    list.sort(order);
    $("count-active").textContent = "(" + active + ")";
    $("count-finished").textContent = "(" + finished + ")";
    const body = document.createDocumentFragment();
    for (const job of list.slice(0, shown)) {
      body.appendChild(row(job, false));
      if (job.summary && expanded.has(job.id)) {
        for (const m of job.summary.members.slice().sort(byIndex)) body.appendChild(row(m, true));
      }
    }
    // A live update redraws the rows: keep the keyboard's place on the focused one.
    const focused = document.activeElement && document.activeElement.closest ? document.activeElement.closest("#job-rows tr") : null;
    const focusedId = focused ? focused.dataset.id : null;
    const focusedLink = focused && document.activeElement.tagName === "A";
    $("job-rows").replaceChildren(body);
    if (focusedId !== null) {
      for (const tr of $("job-rows").children) {
        if (tr.dataset.id === focusedId) { (focusedLink ? tr.querySelector("a") : tr).focus(); break; }
      }
    }
    if (!render.marked && list.length) { render.marked = true; performance.mark("kbatch-first-rows"); }
    $("jobs").classList.toggle("all-users", allUsers());
    $("empty").hidden = list.length > 0;
    const more = $("more");
    more.hidden = list.length <= shown;
    more.textContent = "Show more (" + Math.min(PAGE, list.length - shown) + " of " + (list.length - shown) + " not shown)";
  }
  function selectTab(name) {
    tab = name;
    shown = PAGE;
    $("tab-active").setAttribute("aria-selected", String(name === "active"));
    $("tab-finished").setAttribute("aria-selected", String(name === "finished"));
    render();
  }

  // -- one job ------------------------------------------------------------------------
  function field(dl, name, value) {
    if (value === null || value === undefined || value === "") return;
    dl.appendChild(el("dt", name));
    dl.appendChild(el("dd", value));
  }
  function showJobFields(job) {
    $("job-title").textContent = job.name + " (" + job.id + ")";
    const dl = $("job-fields");
    dl.replaceChildren();
    field(dl, "User", job.user);
    const state = el("dd"); state.appendChild(el("span", job.state, "state state-" + job.state));
    dl.appendChild(el("dt", "State")); dl.appendChild(state);
    field(dl, "Reason", job.reason && job.reason !== "None" ? job.reason : "");
    field(dl, "Exit code", job.exit_code);
    field(dl, "Cancelled by", job.cancelled_by);
    field(dl, "Time used", duration(used(job)));
    field(dl, "Time limit", job.time_limit ? duration(job.time_limit) : "none");
    field(dl, "CPUs", job.cpus);
    field(dl, "Memory", bytes(job.memory) || "default");
    field(dl, "GPUs", job.gpus);
    field(dl, "Submitted", when(job.submitted));
    field(dl, "Started", when(job.started));
    field(dl, "Ended", when(job.finished));
    field(dl, "Working directory", job.workdir);
    field(dl, "Output file", job.output);
    field(dl, "Error file", job.error);
    field(dl, "Comment", job.comment);
    field(dl, "Backend", job.backend);
    const isArray = !!job.array_counts;
    if (isArray) {
      field(dl, "Tasks", job.array_tasks + (job.array_throttle ? " (at most " + job.array_throttle + " at once)" : ""));
      field(dl, "Tasks per state", countsText(job.array_counts));
    } else if (job.array_job_id) {
      field(dl, "Array", job.array_job_id + ", task " + job.array_task_id);
    }
    $("tasks-section").hidden = !isArray;
    $("output-section").hidden = isArray;
    if (isArray) showTaskLinks(job);
    const done = TERMINAL.has(job.state);
    $("act-cancel").disabled = done;
    $("act-hold").disabled = isArray ? !(job.array_counts.PENDING) : job.state !== "PENDING" || job.reason === "JobHeldUser";
    $("act-release").disabled = job.reason !== "JobHeldUser";
  }
  function showTaskLinks(job) {
    const list = $("task-links");
    list.replaceChildren();
    const id = job.array_job_id || job.id;
    const members = [...jobs.values()].filter((m) => m.array_job_id === id).sort(byIndex);
    for (const m of members) {
      const li = el("li");
      const mid = memberId(m);
      const a = el("a", mid);
      a.href = "jobs/" + encodeURIComponent(mid);
      li.appendChild(a);
      li.appendChild(el("span", " " + m.state + (m.exit_code !== null && m.exit_code !== undefined ? " (exit " + m.exit_code + ")" : ""), "state-" + m.state));
      list.appendChild(li);
    }
  }
  async function follow(job, stream, pre) {
    const abort = new AbortController();
    logAborts.push(abort);
    const url = "api/v1/jobs/" + encodeURIComponent(job.id) + "/logs?stream=" + stream;
    try {
      const r = await fetch(url + "&follow=true", { signal: abort.signal, credentials: "same-origin" });
      if (!r.ok) { pre.textContent = "(no output: HTTP " + r.status + ")"; return; }
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      pre.textContent = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
        pre.appendChild(document.createTextNode(decoder.decode(value, { stream: true })));
        if (atEnd) pre.scrollTop = pre.scrollHeight;
      }
    } catch (e) {
      if (e.name !== "AbortError") pre.appendChild(document.createTextNode("\n(stopped: " + e.message + ")"));
    }
  }
  async function openJob(id) {
    currentJob = id;
    $("list-view").hidden = true;
    $("job-view").hidden = false;
    let job;
    try {
      job = await api("GET", "api/v1/jobs/" + encodeURIComponent(id));
    } catch (e) {
      $("job-title").textContent = e.status === 404 ? "No such job" : "Error";
      $("job-fields").replaceChildren(el("p", e.message));
      for (const b of document.querySelectorAll(".actions button")) b.disabled = true;
      return;
    }
    document.title = "kbatch: " + job.name + " (" + job.id + ")";
    if (job.array_counts) showJobFields(job);  // an array as a whole: not a row of the list
    else job = merge(job);
    const apart = job.error && job.error !== job.output;
    $("error-section").hidden = !apart;
    $("dl-output").href = "api/v1/jobs/" + encodeURIComponent(id) + "/logs?stream=output";
    $("dl-output").setAttribute("download", "kbatch-" + id + ".out");
    $("dl-error").href = "api/v1/jobs/" + encodeURIComponent(id) + "/logs?stream=error";
    $("dl-error").setAttribute("download", "kbatch-" + id + ".err");
    if (!job.array_counts) {
      follow(job, "output", $("log-output"));
      if (apart) follow(job, "error", $("log-error"));
    }
    try {
      const spec = await api("GET", "dashboard/jobs/" + encodeURIComponent(id) + "/spec");
      $("job-script").textContent = spec.script;
      openJob.spec = spec;
      if (job.user !== me.user) {  // an admin's view of another user's job: theirs to resubmit
        $("act-resubmit").disabled = true;
        $("act-edit").disabled = true;
      }
    } catch (e) {
      $("job-script").textContent = "(" + e.message + ")";
      openJob.spec = null;
      $("act-resubmit").disabled = true;
      $("act-edit").disabled = true;
    }
  }
  // An array's page shows its tasks together: re-read it (at most every half second).
  function refreshCurrent() {
    if (refreshCurrent.timer) return;
    refreshCurrent.timer = setTimeout(async () => {
      refreshCurrent.timer = null;
      try { showJobFields(await api("GET", "api/v1/jobs/" + encodeURIComponent(currentJob))); } catch (e) { /* shown on the next action */ }
    }, 500);
  }
  async function action(verb, question) {
    if (!window.confirm(question)) return;
    try {
      const answer = await api("POST", "api/v1/jobs/" + encodeURIComponent(currentJob) + "/" + verb);
      const job = answer.array_counts ? answer : merge(answer);
      if (answer.array_counts) showJobFields(answer);
      flash(verb + ": done for job " + job.id, true);
    } catch (e) { flash(verb + " failed: " + e.message); }
  }
  async function submit(spec, question) {
    if (question && !window.confirm(question)) return null;
    const job = await api("POST", "api/v1/jobs", { spec }, { "Idempotency-Key": crypto.randomUUID() });
    flash("Submitted job " + job.id, true);
    return job;
  }

  // -- the form -----------------------------------------------------------------------
  let formBase = null;
  function openForm(spec) {
    formBase = spec ? Object.assign({}, spec) : null;
    $("submit-title").textContent = spec ? "Edit and resubmit" : "New job";
    if (!spec && !$("f-workdir").value) {
      // Where the user's latest job ran: usually where the next one should.
      let latest = null;
      for (const job of jobs.values()) {
        if (job.user === me.user && job.workdir && (!latest || job.submitted > latest.submitted)) latest = job;
      }
      if (latest) $("f-workdir").value = latest.workdir;
    }
    if (spec) {
      $("f-workdir").value = spec.workdir || "";
      $("f-script").value = spec.script;
      $("f-name").value = spec.name || "";
      $("f-cpus").value = spec.cpus || 1;
      $("f-memory").value = spec.memory ? bytes(spec.memory) : "";
      $("f-gpus").value = spec.gpus || 0;
      $("f-time").value = spec.time_limit ? duration(spec.time_limit) : "";
    }
    $("submit-error").textContent = "";
    $("submit-dialog").showModal();
  }
  async function submitForm(ev) {
    ev.preventDefault();
    let spec;
    try {
      spec = Object.assign({}, formBase || {}, {
        script: $("f-script").value,
        cpus: parseInt($("f-cpus").value || "1", 10),
        gpus: parseInt($("f-gpus").value || "0", 10),
      });
      const workdir = $("f-workdir").value.trim();
      if (workdir) spec.workdir = workdir; else delete spec.workdir;
      const name = $("f-name").value.trim();
      if (name) spec.name = name; else delete spec.name;
      const memory = parseMemory($("f-memory").value);
      if (memory === null) delete spec.memory; else spec.memory = memory;
      const time = parseTime($("f-time").value);
      if (time === null) delete spec.time_limit; else spec.time_limit = time;
      delete spec.hold;
    } catch (e) { $("submit-error").textContent = e.message; return; }
    if (!window.confirm("Submit this job?")) return;
    try {
      const job = await submit(spec);
      $("submit-dialog").close();
      if (job && !$("job-view").hidden) location.href = "jobs/" + encodeURIComponent(job.id);
    } catch (e) { $("submit-error").textContent = e.message; }
  }

  // -- start ---------------------------------------------------------------------------
  function route() {
    const base = new URL(document.baseURI);
    const path = location.pathname.slice(base.pathname.length);
    const m = /^jobs\/([^/]+)$/.exec(path);
    return m ? decodeURIComponent(m[1]) : null;
  }
  async function start() {
    try {
      me = await api("GET", "dashboard/session");
    } catch (e) {
      if (e.status === 401) { location.href = "./"; return; }
      flash("Cannot reach the server: " + e.message);
      return;
    }
    csrf = me.csrf;
    $("who").textContent = me.user + (me.admin ? " (admin)" : "");
    if (me.admin) $("all-users-label").hidden = false;
    const sel = $("filter-state");
    for (const s of STATES) sel.appendChild(el("option", s));
    $("tab-active").addEventListener("click", () => selectTab("active"));
    $("tab-finished").addEventListener("click", () => selectTab("finished"));
    for (const id of ["filter-state", "filter-text", "filter-user"]) {
      $(id).addEventListener("input", () => { shown = PAGE; render(); });
    }
    $("all-users").addEventListener("change", () => {
      $("user-filter-label").hidden = !allUsers();
      connect();
    });
    $("more").addEventListener("click", () => { shown += PAGE; render(); });
    $("job-rows").addEventListener("click", (ev) => {
      const toggle = ev.target.closest("button.expand");
      if (toggle) {
        const id = toggle.dataset.array;
        if (expanded.has(id)) expanded.delete(id); else expanded.add(id);
        render();
        return;
      }
      const tr = ev.target.closest("tr");
      if (tr && ev.target.tagName !== "A") location.href = "jobs/" + encodeURIComponent(tr.dataset.id);
    });
    $("job-rows").addEventListener("keydown", (ev) => {
      if (ev.target.closest("button.expand")) return;  // Enter on the button toggles it
      const tr = ev.target.closest("tr");
      if (tr && ev.key === "Enter") location.href = "jobs/" + encodeURIComponent(tr.dataset.id);
    });
    $("new-job").addEventListener("click", () => openForm(null));
    $("cancel-tasks").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const which = $("cancel-tasks-list").value.trim();
      const array = currentJob.split("_")[0];
      const ref = array + "_[" + which + "]";
      if (!window.confirm("Cancel tasks " + which + " of array " + array + "?")) return;
      try {
        const job = await api("POST", "api/v1/jobs/" + encodeURIComponent(ref) + "/cancel");
        flash("cancel: done for " + job.id, true);
        refreshCurrent();
      } catch (e) { flash("cancel failed: " + e.message); }
    });
    $("f-cancel").addEventListener("click", () => $("submit-dialog").close());
    $("submit-form").addEventListener("submit", submitForm);
    $("act-cancel").addEventListener("click", () => action("cancel", "Cancel job " + currentJob + "?"));
    $("act-hold").addEventListener("click", () => action("hold", "Hold job " + currentJob + "?"));
    $("act-release").addEventListener("click", () => action("release", "Release job " + currentJob + "?"));
    $("act-resubmit").addEventListener("click", async () => {
      if (!openJob.spec) return;
      try {
        const job = await submit(Object.assign({}, openJob.spec, { hold: false }), "Resubmit job " + currentJob + " with the same spec?");
        if (job) location.href = "jobs/" + encodeURIComponent(job.id);
      } catch (e) { flash("Resubmit failed: " + e.message); }
    });
    $("act-edit").addEventListener("click", () => { if (openJob.spec) openForm(openJob.spec); });
    $("logout").addEventListener("click", async () => {
      await fetch("logout", { method: "POST", headers: { "X-Kbatch-CSRF": csrf }, credentials: "same-origin" });
      location.href = "./";
    });
    // Time used grows while jobs run: redraw now and then (no request to the server).
    setInterval(() => {
      if (!$("list-view").hidden && tab === "active") queueRender();
      else if (currentJob && jobs.has(currentJob) && !TERMINAL.has(jobs.get(currentJob).state)) showJobFields(jobs.get(currentJob));
    }, 5000);
    const id = route();
    if (id !== null) {
      await openJob(id);
    } else {
      $("list-view").hidden = false;
    }
    connect();
  }
  document.addEventListener("DOMContentLoaded", start);
})();
