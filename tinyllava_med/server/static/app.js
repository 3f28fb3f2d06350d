// TinyLLaVA-Med reading room: worklist, image viewer, streamed questions, report editing and
// signing. Plain browser JavaScript, no build step. All text from the server is put in the page
// with textContent (never innerHTML). The API key lives in sessionStorage only.
"use strict";

(() => {
  const KEY_STORAGE = "tinyllava_med.api_key";
  // a draft's unsaved text when the reader is signed out (by the button or a refused key),
  // given back once they are in again with the same key: {id, version, text, key}
  const UNSAVED_STORAGE = "tinyllava_med.unsaved_report";
  // the study a reader was in when signed out: the page goes back to it only for the same key
  const RETURN_STORAGE = "tinyllava_med.return_to";
  // the worklist's filters, kept over a reload of this tab (cleared at sign-out)
  const FILTERS_STORAGE = "tinyllava_med.worklist_filters";
  const FILTER_FIELDS = ["filter-modality", "filter-report", "filter-accession", "filter-date-from", "filter-date-to"];

  function keepFilters() {
    const values = Object.fromEntries(FILTER_FIELDS.map((id) => [id, $(id).value]));
    sessionStorage.setItem(FILTERS_STORAGE, JSON.stringify(values));
  }

  // what this tab keeps under `name` (null: nothing, or something unreadable)
  function storedJson(name) {
    try {
      return JSON.parse(sessionStorage.getItem(name) || "null");
    } catch (_) {
      return null;
    }
  }

  function restoreFilters() {
    const kept = storedJson(FILTERS_STORAGE);
    for (const id of FILTER_FIELDS) {
      if (kept && typeof kept[id] === "string") $(id).value = kept[id];
    }
  }
  // the page's tabs in this browser tell each other of a sign-out
  const tabs = "BroadcastChannel" in window ? new BroadcastChannel("tinyllava_med") : null;
  const WINDOWS = [
    ["default", "Default"],
    ["soft-tissue", "Soft tissue"],
    ["lung", "Lung"],
    ["bone", "Bone"],
    ["brain", "Brain"],
  ];
  const PAGE_SIZE = 50;
  const READY_RECHECK_MS = 30_000; // /readyz again while the model is ready

  const $ = (id) => document.getElementById(id);

  // A field's text as the server takes it: a word processor's line and page breaks (vertical
  // tab, form feed) become line breaks, and other control characters, which no report may hold
  // (the server answers 422), go. The field then shows exactly what is sent.
  const typed = (id) => {
    const field = $(id);
    const text = field.value.replace(/[\v\f]/g, "\n").replace(/[\x00-\x08\x0e-\x1f\x7f]/g, "");
    if (text !== field.value) field.value = text;
    return text;
  };

  const state = {
    key: sessionStorage.getItem(KEY_STORAGE),
    me: null, // the key's role and permissions (/v1/apikeys/me), read once per sign-in
    studies: [],
    studyCount: 0,
    study: null,
    imageIndex: 0,
    frame: 0,
    window: "default",
    imageSeq: 0,
    imageUrl: null,
    prepared: null, // the image (study, index, frame) the model was last asked to prepare
    reports: [],
    reportId: null,
    streaming: null, // AbortController while an answer streams
    amendDraft: null, // {id, text, reason} of an amendment that failed or was cancelled, offered again
    amendments: null, // {id, version, entries}: the shown amended report's replaced texts
    shownHash: "", // the address of the view shown
    modelTimer: null,
    worklistTimer: null,
    view: { zoom: 1, x: 0, y: 0 }, // the image's zoom and pan (pixels from the stage's centre)
    notice: null, // a message for the next view ("study deleted")
    nav: 0, // navigation counter: a view's late results are dropped once the user moved on
  };

  // --- API ------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message, detail = null, retryAfter = null) {
      super(message);
      this.status = status;
      this.code = code;
      this.detail = detail;
      this.retryAfter = retryAfter;
    }
  }

  async function errorOf(response) {
    let code = `http_${response.status}`;
    let message = response.statusText || "the request failed";
    let detail = null;
    try {
      const body = await response.json();
      if (body && body.error) {
        code = body.error.code || code;
        message = body.error.message || message;
        detail = body.error.detail ?? null;
      }
    } catch (_) {
      // not JSON (a proxy's page): keep the status line
    }
    return new ApiError(response.status, code, message, detail, response.headers.get("Retry-After"));
  }

  async function api(path, { method = "GET", json, body, raw = false, signal, ifMatch } = {}) {
    const headers = new Headers();
    if (state.key) headers.set("Authorization", `Bearer ${state.key}`);
    if (ifMatch) headers.set("If-Match", `"${ifMatch}"`);
    let payload = body;
    if (json !== undefined) {
      headers.set("Content-Type", "application/json");
      payload = JSON.stringify(json);
    }
    let response;
    try {
      response = await fetch(path, { method, headers, body: payload, cache: "no-store", signal });
    } catch (e) {
      if (e && e.name === "AbortError") throw e;
      throw new ApiError(0, "network_error", "the server cannot be reached");
    }
    if (!response.ok) throw await errorOf(response);
    if (raw) return response;
    if (response.status === 204) return null;
    return response.json();
  }

  // --- messages -------------------------------------------------------------------------------

  function hintFor(err) {
    switch (err.status) {
      case 0:
        return "Check the network connection, then retry.";
      case 403:
        return "Your key's role does not allow this action.";
      case 412:
        return (
          "Someone else changed this report after you opened it, so nothing was saved or " +
          "signed. The list now shows their version; the editor still holds what you typed. " +
          "Read both, then save or sign again."
        );
      case 413:
        return err.detail && err.detail.imaging_code
          ? "The image is larger (in pixels, frames or decoded size) than this server accepts."
          : "The upload is too large for this server. Send fewer or smaller files.";
      case 415:
        return "Only DICOM Part 10, PNG and JPEG files are accepted.";
      case 503: {
        if (err.code === "pacs_not_configured") {
          return "This server has no PACS to retrieve from; upload the files instead.";
        }
        const wait = err.retryAfter ? ` in ${err.retryAfter} s` : " in a few seconds";
        if (err.code === "decode_busy") {
          return `The server is decoding other large images. Retry${wait}.`;
        }
        return err.code === "queue_full"
          ? `The server is busy. Retry${wait}.`
          : `The model is loading or unavailable. Retry${wait}.`;
      }
      case 502:
        if (err.code === "engine_failed") {
          return "The model failed on this question; the other questions are answered. Retry, or ask it differently.";
        }
        if (err.code === "stream_incomplete") {
          return "The answer stopped before it was stored. Ask again.";
        }
        return /pacs|retrieve/.test(err.code || "")
          ? "The PACS did not answer. Retry later, or ask IT to check the PACS connection."
          : "The server behind this page did not answer. Retry later, or ask IT.";
      case 504:
        return "The model took too long. Retry, or ask a shorter question.";
      default:
        return "";
    }
  }

  function clearError() {
    $("alerts").replaceChildren();
    for (const f of document.querySelectorAll("[aria-invalid='true']")) unmarkField(f);
  }

  // An error about what was typed (or not) in a field: the field is marked invalid and
  // described by the message, and gets the focus; typing in it again clears the mark.
  function fieldError(err, context, field) {
    showError(err, context);
    field.setAttribute("aria-invalid", "true");
    const ids = (field.getAttribute("aria-describedby") || "").split(" ").filter(Boolean);
    if (!ids.includes("alerts")) field.setAttribute("aria-describedby", [...ids, "alerts"].join(" "));
    field.addEventListener("input", () => unmarkField(field), { once: true });
    field.focus();
  }

  function unmarkField(field) {
    field.removeAttribute("aria-invalid");
    const ids = (field.getAttribute("aria-describedby") || "").split(" ")
      .filter((id) => id && id !== "alerts");
    if (ids.length) field.setAttribute("aria-describedby", ids.join(" "));
    else field.removeAttribute("aria-describedby");
  }

  // Show `err` (an ApiError or any Error) in the alert region; a 401 signs out.
  function showError(err, context) {
    if (err && err.name === "AbortError") return;
    if (err instanceof ApiError && err.status === 401) {
      signOut(`Your API key was not accepted (${err.message}). Sign in again.`, err.code);
      return;
    }
    const box = document.createElement("div");
    box.className = "alert";
    const text = document.createElement("p");
    const strong = document.createElement("strong");
    strong.textContent = context ? `${context}: ` : "Error: ";
    text.append(strong, err && err.message ? err.message : String(err));
    if (err instanceof ApiError) {
      const code = document.createElement("code");
      code.className = "error-code";
      code.textContent = err.code;
      text.append(" ", code);
      const hint = hintFor(err);
      if (hint) {
        const h = document.createElement("span");
        h.className = "hint";
        h.textContent = ` ${hint}`;
        text.append(h);
      }
    }
    const close = document.createElement("button");
    close.type = "button";
    close.className = "btn btn-small";
    close.textContent = "Dismiss";
    close.setAttribute("aria-label", "Dismiss the error message");
    // the keyboard goes back where it was (the button that failed), else to the view's heading,
    // not to the top of the page with the removed button
    const before = document.activeElement;
    close.addEventListener("click", () => {
      clearError();
      const usable = before && before !== document.body && before.isConnected &&
        !before.disabled && !before.closest("[hidden]");
      const back = usable ? before : document.querySelector(".view:not([hidden]) h1");
      if (!back) return;
      if (!usable && !back.hasAttribute("tabindex")) back.tabIndex = -1;
      back.focus();
    });
    box.append(text, close);
    $("alerts").replaceChildren(box);
  }

  // A focused button that disables or hides itself sends the keyboard focus to <body>, and a
  // keyboard or screen-reader user loses their place. Where that happens, the focus goes to
  // `target` once it is usable again, unless the user has put it somewhere else meanwhile.
  function focusLost() {
    const a = document.activeElement;
    return !a || a === document.body;
  }

  // `from`: a control about to be disabled or hidden, which holds the focus until the browser
  // drops it (after this handler): the focus goes on from it too
  function refocus(target, from) {
    const leaving = from && document.activeElement === from;
    if (!(leaving || focusLost()) || !target || target.disabled || !target.isConnected) return;
    if (target.closest("[hidden]") || (target.checkVisibility && !target.checkVisibility())) return;
    target.focus();
  }

  function setStatus(id, text) {
    $(id).textContent = text;
  }

  // --- formatting -----------------------------------------------------------------------------

  const dateFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });

  function when(iso) {
    if (!iso) return "";
    // The database may drop the zone; the server always stores UTC.
    const s = /(?:[zZ]|[+-]\d\d:?\d\d)$/.test(iso) ? iso : `${iso}Z`;
    const d = new Date(s);
    return Number.isNaN(d.getTime()) ? iso : dateFormat.format(d);
  }

  function studyDate(s) {
    return s.StudyDate || "—";
  }

  function studyLabel(s) {
    const modality = s.Modality || "Unknown modality";
    return s.BodyPartExamined ? `${modality} · ${s.BodyPartExamined}` : modality;
  }

  // a report's status, and a study's in the worklist (signed: all its reports are, some perhaps
  // amended; a study with a draft beside signed reports awaits a signature)
  const STATUS_TEXT = {
    none: "None", draft: "Draft", final: "Final", amended: "Amended", signed: "Signed",
  };
  const SIGNED = new Set(["final", "amended"]);

  function badge(status) {
    const b = document.createElement("span");
    b.className = "badge";
    b.dataset.status = status;
    b.textContent = STATUS_TEXT[status] || status;
    return b;
  }

  function el(tag, text, className) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = text;
    if (className) e.className = className;
    return e;
  }

  // --- views and routing ----------------------------------------------------------------------

  const VIEWS = ["signin", "worklist", "study"];
  const TITLES = { signin: "Sign in", worklist: "Worklist", study: "Study" };

  function showView(name, { focus = true } = {}) {
    for (const v of VIEWS) $(`view-${v}`).hidden = v !== name;
    const signedIn = name !== "signin";
    $("topnav").hidden = !signedIn;
    $("session").hidden = !signedIn;
    if (name === "worklist") $("nav-worklist").setAttribute("aria-current", "page");
    else $("nav-worklist").removeAttribute("aria-current");
    document.title = `${TITLES[name]} · TinyLLaVA-Med reading room`;
    if (!focus) return;
    if (name === "signin") $("api-key").focus();
    else $(`${name}-title`).focus();
  }

  async function route() {
    state.nav += 1;
    clearPrintSheet();
    if (!state.key) {
      showView("signin");
      return;
    }
    if (!state.me && !(await loadMe())) return;
    returnAfterSignIn();
    state.shownHash = location.hash; // what a declined "discard?" puts back
    $("key-label").textContent = keyLabel(state.key);
    const m = location.hash.match(/^#\/study\/([A-Za-z0-9_-]+)$/);
    if (m) await openStudy(m[1]);
    else await openWorklist();
  }

  // Signed in again with the key that was signed out of a study: back to that study (a link
  // followed meanwhile wins); any other key starts at the worklist.
  function returnAfterSignIn() {
    const back = storedJson(RETURN_STORAGE);
    sessionStorage.removeItem(RETURN_STORAGE);
    const same = back && back.key && state.me && back.key === state.me.id;
    if (same && (location.hash === "" || location.hash === "#/")) {
      history.replaceState(null, "", back.hash);
    }
  }

  function keyLabel(key) {
    const m = key.match(/^tlm_([0-9a-f]{8})_/);
    const who = m ? `Key ${m[1]}` : "Signed in";
    return state.me && state.me.role ? `${who} · ${state.me.role}` : who;
  }

  // What the key may do, so the page offers only what the server will allow (the server
  // checks every call anyway). False when the key was refused (signed out).
  async function loadMe() {
    try {
      state.me = await api("/v1/apikeys/me");
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) {
        showError(err);
        return false;
      }
      state.me = null; // an older server, or a network error: offer everything
    }
    // retrieving needs a PACS the server is configured for (an older server does not say)
    const features = state.me && state.me.features;
    $("retrieve-form").hidden = !!features && !features.includes("retrieve");
    return true;
  }

  function can(permission) {
    return !state.me || state.me.permissions.includes(permission);
  }

  // --- sign in / out --------------------------------------------------------------------------

  async function signIn(event) {
    event.preventDefault();
    const key = $("api-key").value.trim();
    clearError();
    if (!key) {
      fieldError(new Error("enter your API key"), "Sign in", $("api-key"));
      return;
    }
    $("signin-submit").disabled = true;
    setStatus("signin-status", "Checking the key…");
    state.key = key;
    const nav = state.nav;
    try {
      await api("/v1/studies?limit=1");
      sessionStorage.setItem(KEY_STORAGE, key);
      $("api-key").value = "";
      setStatus("signin-status", "");
      // a link followed while the key was checked has opened its page already: opening it
      // again would drop what that page restored (text typed before a sign-out)
      if (nav === state.nav) await route();
    } catch (err) {
      state.key = null;
      setStatus("signin-status", "");
      if (err instanceof ApiError && err.status === 401) {
        // Not showError: a 401 there means "signed out", here it means "try another key".
        const box = el("div", null, "alert");
        const p = el("p");
        p.append(el("strong", "Sign in: "), "this API key is not valid or was revoked. ");
        p.append(el("code", err.code, "error-code"));
        box.append(p);
        $("alerts").replaceChildren(box);
      } else {
        showError(err, "Sign in");
      }
      $("api-key").focus();
    } finally {
      $("signin-submit").disabled = false;
    }
  }

  function signOut(message, code) {
    if (isDirty()) {
      const r = currentReport();
      const kept = { id: r.id, version: r.version, text: $("report-text").value, key: state.me && state.me.id };
      sessionStorage.setItem(UNSAVED_STORAGE, JSON.stringify(kept));
    }
    if (state.streaming) state.streaming.abort();
    clearPrintSheet();
    state.amendDraft = null;
    sessionStorage.removeItem(FILTERS_STORAGE); // the next reader starts with the whole list
    for (const id of FILTER_FIELDS) $(id).value = "";
    if (location.hash.startsWith("#/study/")) {
      // the next reader at this screen signs in to the worklist, not into this study
      const back = { hash: location.hash, key: state.me && state.me.id };
      sessionStorage.setItem(RETURN_STORAGE, JSON.stringify(back));
      history.replaceState(null, "", "#/");
    }
    sessionStorage.removeItem(KEY_STORAGE);
    state.key = null;
    state.me = null;
    state.study = null;
    state.studies = [];
    state.reports = [];
    releaseImage();
    clearError();
    if (message) {
      const box = el("div", null, "alert");
      const p = el("p");
      p.append(el("strong", "Signed out: "), message);
      if (code) p.append(" ", el("code", code, "error-code"));
      box.append(p);
      $("alerts").replaceChildren(box);
    } else {
      setStatus("signin-status", "You are signed out.");
    }
    showView("signin");
  }

  // --- model info (footer) --------------------------------------------------------------------

  async function refreshModel() {
    clearTimeout(state.modelTimer);
    let body = null;
    try {
      const r = await fetch("/readyz", { cache: "no-store" });
      body = await r.json();
    } catch (_) {
      body = null;
    }
    const line = $("model-line");
    const badgeEl = $("model-state");
    const info = body && body.model;
    const ready = body && body.status === "ready";
    const modelState = body && body.checks ? body.checks.model : "unreachable";
    if (info) {
      const parts = [info.model];
      if (info.variant && info.variant !== info.model) parts.push(info.variant);
      parts.push(`quantization ${info.quantization}`);
      if (info.model_version) parts.push(`version ${info.model_version}`);
      line.textContent = `Model: ${parts.join(" · ")}${ready ? "" : ` (${modelState})`}`;
    } else {
      line.textContent = `Model: ${modelState === "failed" ? "failed to load" : modelState}`;
    }
    const isDemo = !!info && (info.model === "demo" || info.variant === "demo");
    $("demo-warning").hidden = !isDemo;
    const unreachable = body === null;
    badgeEl.dataset.state = ready
      ? "ready"
      : modelState === "failed" || unreachable
        ? "failed"
        : "loading";
    badgeEl.textContent = ready
      ? `Model ready${isDemo ? " (demo)" : ""}`
      : unreachable
        ? "Server unreachable"
        : modelState === "failed"
          ? "Model failed to load"
          : "Model loading…";
    // checked again while ready too: a server that stopped or restarted is said so
    state.modelTimer = setTimeout(refreshModel, ready ? READY_RECHECK_MS : 5000);
  }

  // --- worklist -------------------------------------------------------------------------------

  async function openWorklist() {
    showView("worklist");
    releaseImage();
    state.study = null;
    if (state.notice) setStatus("upload-status", state.notice);
    state.notice = null;
    await loadWorklist(false);
  }

  function worklistQuery(limit, offset) {
    const params = new URLSearchParams({ limit: String(limit), offset: String(offset) });
    const modality = $("filter-modality").value;
    if (modality) params.set("modality", modality);
    const reportStatus = $("filter-report").value;
    if (reportStatus) params.set("report_status", reportStatus);
    const accession = $("filter-accession").value.trim();
    if (accession) params.set("accession_number", accession);
    if ($("filter-date-from").value) params.set("study_date_from", $("filter-date-from").value);
    if ($("filter-date-to").value) params.set("study_date_to", $("filter-date-to").value);
    return `/v1/studies?${params}`;
  }

  // Each load is numbered: a slower reply to an earlier filter is dropped, and "Load more"
  // waits for its page (a double click asked for the same rows twice)
  async function loadWorklist(append) {
    keepFilters();
    const nav = state.nav;
    const seq = (state.worklistSeq = (state.worklistSeq || 0) + 1);
    const from = $("filter-date-from").value;
    const to = $("filter-date-to").value;
    if (from && to && from > to) { // nothing can match: no list of the dates before
      state.studies = [];
      state.studyCount = 0;
      renderWorklist([], false);
      fieldError(new Error("the end date is before the start date"), "Study dates", $("filter-date-to"));
      return;
    }
    $("worklist-table").setAttribute("aria-busy", "true");
    $("worklist-more").disabled = true;
    try {
      const list = await api(worklistQuery(PAGE_SIZE, append ? state.studies.length : 0));
      if (nav !== state.nav || seq !== state.worklistSeq) return;
      const shownBefore = state.studies.length;
      state.studies = append ? state.studies.concat(list.data) : list.data;
      state.studyCount = list.count;
      renderWorklist(list.data, append);
      if (append) refocus($("worklist-body").rows[shownBefore]?.querySelector("a"));
    } catch (err) {
      showError(err, "Loading the worklist");
    } finally {
      if (seq === state.worklistSeq) {
        $("worklist-table").setAttribute("aria-busy", "false");
        $("worklist-more").disabled = false;
        if (append) refocus($("worklist-more"));
      }
    }
  }

  // Studies arrive in the background (STOW-RS, DIMSE, retrieves) and automatic reports turn
  // them into drafts: the shown worklist is read again every WORKLIST_REFRESH_MS while the tab
  // is visible, as many rows as are shown, and redrawn only when something changed and the
  // reader is not in the table (a redraw would take the keyboard focus away). Errors wait for
  // the next round; the reader's own actions still report theirs.
  const WORKLIST_REFRESH_MS = 20_000;

  function worklistSignature(studies, count) {
    return `${count}|${studies.map((s) => `${s.id}:${s.report_status}:${s.reports}`).join(",")}`;
  }

  // "Update automatically" (on by default) may be turned off: rows that move while a reader
  // with a magnifier reads them are a barrier; Refresh still reads the list on demand.
  const autoRefresh = () => $("worklist-auto").checked;

  async function refreshWorklistQuietly() {
    const nav = state.nav;
    if ($("view-worklist").hidden || document.visibilityState !== "visible" || !state.key) return;
    if (!autoRefresh()) return;
    if ($("worklist-body").contains(document.activeElement)) return;
    try {
      const list = await api(worklistQuery(Math.max(PAGE_SIZE, state.studies.length), 0));
      if (nav !== state.nav || $("worklist-body").contains(document.activeElement)) return;
      const shown = worklistSignature(state.studies, state.studyCount);
      if (worklistSignature(list.data, list.count) === shown) return;
      state.studies = list.data;
      state.studyCount = list.count;
      renderWorklist(list.data, false);
    } catch (_) {
      // the next round tries again
    }
  }

  // The open study's reports are read again on the same beat: a colleague's signature or an
  // automatic draft shows without a click. The report open is redrawn only when it changed
  // and nothing is typed or being signed in it; otherwise the list shows the new version.
  function reportsSignature(reports) {
    return reports.map((r) => `${r.id}:${r.version}`).join(",");
  }

  async function refreshReportsQuietly() {
    const s = state.study;
    if ($("view-study").hidden || document.visibilityState !== "visible" || !s) return;
    if (state.streaming || !autoRefresh()) return;  // the answer's own end reads them
    try {
      const params = new URLSearchParams({ study_id: s.id, limit: "500" });
      const list = await api(`/v1/reports?${params}`);
      if (state.study !== s || reportsSignature(list.data) === reportsSignature(state.reports)) {
        return;
      }
      const shown = currentReport();
      const fresh = list.data.find((r) => r.id === state.reportId);
      const busyHere = isDirty() || dialogOpen();
      state.reports = busyHere && shown ? list.data.map((r) => (r.id === shown.id ? shown : r))
        : list.data;
      renderHistory();
      if (!busyHere && fresh && shown && fresh.version !== shown.version) selectReport(fresh.id);
    } catch (_) {
      // the next round tries again
    }
  }

  function scheduleWorklistRefresh() {
    clearTimeout(state.worklistTimer);
    state.worklistTimer = setTimeout(async () => {
      await refreshWorklistQuietly();
      await refreshReportsQuietly();
      scheduleWorklistRefresh();
    }, WORKLIST_REFRESH_MS);
  }

  function renderWorklist(rows, append) {
    const body = $("worklist-body");
    if (!append) body.replaceChildren();
    for (const s of rows) {
      const tr = document.createElement("tr");
      tr.dataset.studyId = s.id;
      const first = document.createElement("td");
      const link = el("a", `${studyLabel(s)} study`, "study-link");
      link.href = `#/study/${encodeURIComponent(s.id)}`;
      link.setAttribute("aria-label",
        `${studyLabel(s)} study, study date ${studyDate(s)}, received ${when(s.created_at)}`);
      first.append(link);
      const status = el("td", null, "status-cell");
      // a study with a draft still needs work; an older server sends only `reports`
      const reportState = s.report_status || (s.reports > 0 ? "unknown" : "none");
      status.append(badge(reportState));
      tr.append(
        first,
        el("td", studyDate(s)),
        el("td", s.AccessionNumber || "—"),
        el("td", String(s.images.length), "num"),
        el("td", when(s.created_at)),
        status,
      );
      body.append(tr);
    }
    const modality = $("filter-modality").value;
    const report = $("filter-report");
    const accession = $("filter-accession").value.trim();
    const from = $("filter-date-from").value;
    const to = $("filter-date-to").value;
    $("worklist-count").textContent =
      `${state.studyCount} ${state.studyCount === 1 ? "study" : "studies"}` +
      (modality ? ` with modality ${modality}` : "") +
      (accession ? ` with accession number ${accession}` : "") +
      (from || to ? `, study date ${from || "…"} to ${to || "…"}` : "") +
      (report.value ? ` · ${report.options[report.selectedIndex].text.toLowerCase()}` : "");
    $("worklist-empty").textContent = modality || accession || from || to || report.value
      ? "No study matches these filters."
      : "No studies yet. Upload a DICOM, PNG or JPEG file to start.";
    $("worklist-empty").hidden = state.studies.length > 0;
    $("worklist-more").hidden = state.studies.length >= state.studyCount;
  }

  async function upload(event) {
    event.preventDefault();
    clearError();
    const files = $("upload-files").files;
    if (!files || files.length === 0) {
      fieldError(new Error("choose one or more DICOM, PNG or JPEG files first"), "Upload", $("upload-files"));
      return;
    }
    const form = new FormData();
    for (const f of files) form.append("files", f, f.name);
    $("upload-submit").disabled = true;
    setStatus("upload-status", `Uploading ${files.length} file${files.length === 1 ? "" : "s"}…`);
    try {
      const response = await api("/v1/studies", { method: "POST", body: form, raw: true });
      const study = await response.json();
      $("upload-form").reset();
      const status = $("upload-status");
      const images = `${study.images.length} image${study.images.length === 1 ? "" : "s"}`;
      // 200: every file was here already (DICOM is filed by its study's UID)
      status.replaceChildren(
        response.status === 200
          ? `Already on the server: ${studyLabel(study)} with ${images}. `
          : `Uploaded: ${studyLabel(study)} with ${images}. `,
      );
      const open = el("a", "Open the study", "study-link");
      open.href = `#/study/${encodeURIComponent(study.id)}`;
      status.append(open);
      await loadWorklist(false);
    } catch (err) {
      setStatus("upload-status", "");
      showError(err, "Upload failed");
    } finally {
      $("upload-submit").disabled = false;
      refocus($("upload-submit"));
    }
  }

  // A CD or folder goes up in batches, so no request nears the server's body limit and the
  // reader sees progress; the server files each image under its study (several per CD). File
  // names stay in the browser: a CD's folders may be named after the patient.
  const IMPORT_BATCH_FILES = 48;
  const IMPORT_BATCH_BYTES = 24 * 1024 * 1024;

  function importBatches(files) {
    const batches = [];
    let batch = [];
    let bytes = 0;
    for (const f of files) {
      if (batch.length && (batch.length >= IMPORT_BATCH_FILES || bytes + f.size > IMPORT_BATCH_BYTES)) {
        batches.push(batch);
        batch = [];
        bytes = 0;
      }
      batch.push(f);
      bytes += f.size;
    }
    if (batch.length) batches.push(batch);
    return batches;
  }

  const total = (counts) => Object.values(counts || {}).reduce((a, b) => a + b, 0);

  async function importMedia(event) {
    event.preventDefault();
    clearError();
    const files = Array.from($("import-folder").files || []);
    if (files.length === 0) {
      fieldError(new Error("choose the CD (its drive) or a folder first"), "Import", $("import-folder"));
      return;
    }
    $("import-submit").disabled = true;
    const sum = { stored: 0, already: 0, skipped: 0, failed: 0, refused: 0 };
    const addFailed = (failed) => {
      // a file whose UIDs name another patient's study here is refused, not unreadable
      const refused = (failed && failed.uid_conflict) || 0;
      sum.refused += refused;
      sum.failed += total(failed) - refused;
    };
    const studies = new Map();
    let sent = 0;
    try {
      for (const batch of importBatches(files)) {
        setStatus("upload-status", `Importing: ${sent} of ${files.length} files…`);
        const form = new FormData();
        for (const f of batch) form.append("files", f, "file");
        try {
          const r = await api("/v1/studies/import", { method: "POST", body: form });
          sum.stored += r.stored;
          sum.already += r.already;
          sum.skipped += total(r.skipped);
          addFailed(r.failed);
          for (const s of r.studies) studies.set(s.id, s);
        } catch (err) {
          if (!(err instanceof ApiError && err.code === "no_images")) throw err;
          sum.skipped += total(err.detail && err.detail.skipped); // a batch of non-images
          addFailed(err.detail && err.detail.failed);
        }
        sent += batch.length;
      }
      $("import-form").reset();
      const status = $("upload-status");
      const n = studies.size;
      status.replaceChildren(
        `Imported ${n} ${n === 1 ? "study" : "studies"}: ${sum.stored} new image${sum.stored === 1 ? "" : "s"}` +
          (sum.already ? `, ${sum.already} already here` : "") +
          (sum.skipped ? `; ${sum.skipped} file${sum.skipped === 1 ? "" : "s"} skipped (not DICOM images)` : "") +
          (sum.failed ? `; ${sum.failed} not readable` : "") +
          (sum.refused
            ? `; ${sum.refused} refused: their UIDs conflict with images on the server (another patient's study, or the same image in another study)`
            : "") +
          ". ",
      );
      for (const s of studies.values()) {
        const open = el("a", `${studyLabel(s)} study, ${studyDate(s)}`, "study-link");
        open.href = `#/study/${encodeURIComponent(s.id)}`;
        status.append(open, " ");
      }
      await loadWorklist(false);
    } catch (err) {
      setStatus("upload-status", "");
      showError(err, `Import stopped after ${sent} of ${files.length} files`);
    } finally {
      $("import-submit").disabled = false;
      refocus($("import-submit"));
    }
  }

  // The PACS fetches a study in a job (GET /v1/jobs/{id}); a long one goes on after we stop waiting.
  async function jobDone(id, { waitMs = 300_000 } = {}) {
    const until = Date.now() + waitMs;
    for (;;) {
      const job = await api(`/v1/jobs/${encodeURIComponent(id)}`);
      if (job.status === "done") return job;
      if (job.status === "failed") {
        throw new ApiError(502, "retrieve_failed", job.last_error || "the retrieve failed");
      }
      if (Date.now() > until) return null;
      await new Promise((resolve) => setTimeout(resolve, 500));
    }
  }

  async function retrieve(event) {
    event.preventDefault();
    clearError();
    const accession = $("retrieve-accession").value.trim();
    if (!accession) {
      fieldError(new Error("enter the accession number of a study the PACS holds"), "Retrieve", $("retrieve-accession"));
      return;
    }
    $("retrieve-submit").disabled = true;
    setStatus("upload-status", `Searching the PACS for accession number ${accession}…`);
    try {
      const queued = await api("/v1/studies/retrieve", {
        method: "POST",
        json: { accession_number: accession },
      });
      const n = queued.jobs.length;
      setStatus("upload-status", `Found ${n} ${n === 1 ? "study" : "studies"}; retrieving…`);
      const jobs = await Promise.all(queued.jobs.map((id) => jobDone(id)));
      const done = jobs.filter(Boolean).map((job) => job.result);
      const status = $("upload-status");
      if (done.length < jobs.length) {
        status.replaceChildren("Still retrieving; the study appears in the worklist when it is here.");
      } else {
        const stored = done.reduce((sum, r) => sum + r.stored, 0);
        const already = done.reduce((sum, r) => sum + r.already, 0);
        const failed = done.reduce((sum, r) => sum + r.failed, 0);
        status.replaceChildren(
          `Retrieved: ${stored} new image${stored === 1 ? "" : "s"}` +
            (already ? `, ${already} already here` : "") +
            (failed ? `, ${failed} not readable` : "") +
            ". ",
        );
        const first = done.find((r) => r.study_id);
        if (first) {
          const open = el("a", "Open the study", "study-link");
          open.href = `#/study/${encodeURIComponent(first.study_id)}`;
          status.append(open);
        }
      }
      $("retrieve-form").reset();
      await loadWorklist(false);
    } catch (err) {
      setStatus("upload-status", "");
      if (err instanceof ApiError && err.code === "pacs_not_configured") {
        $("retrieve-form").hidden = true; // this server has no PACS to ask
      }
      showError(err, "Retrieve failed");
    } finally {
      $("retrieve-submit").disabled = false;
      refocus($("retrieve-submit"));
    }
  }

  // --- study: image ---------------------------------------------------------------------------

  async function openStudy(id) {
    const nav = state.nav;
    showView("study", { focus: false });
    clearError();
    releaseImage();
    state.study = null;
    state.prepared = null; // opened again later: the model may have forgotten it
    state.reports = [];
    state.reportId = null;
    $("study-title").textContent = "Study";
    $("study-meta").replaceChildren();
    $("history").replaceChildren();
    $("report-card").hidden = true;
    $("ask-submit").disabled = true; // until the study is here
    resetAnswer();
    let study;
    try {
      study = await api(`/v1/studies/${encodeURIComponent(id)}`);
      if (nav !== state.nav) return;
    } catch (err) {
      if (nav !== state.nav) return;
      $("viewer-placeholder").textContent = "The study could not be opened.";
      showError(err, "Opening the study");
      $("study-title").focus();
      return;
    }
    state.study = study;
    state.imageIndex = study.images.length ? study.images[0].index : 0;
    state.frame = 0;
    state.window = "default";
    renderStudyHead(study);
    resetView();
    $("study-delete").hidden = !can("study.delete");
    renderImageControls();
    $("ask-submit").disabled = false;
    $("study-title").focus();
    await Promise.all([loadImage(), loadReports()]);
  }

  function currentImage() {
    const s = state.study;
    if (!s) return null;
    return s.images.find((i) => i.index === state.imageIndex) || s.images[0] || null;
  }

  function isCT() {
    const im = currentImage();
    return ((im && im.Modality) || (state.study && state.study.Modality) || "") === "CT";
  }

  function renderStudyHead(s) {
    $("study-title").textContent = `${studyLabel(s)} study`;
    document.title = `${studyLabel(s)} study · TinyLLaVA-Med reading room`;
    const meta = $("study-meta");
    meta.replaceChildren();
    const add = (term, value) => {
      if (value === null || value === undefined || value === "") return;
      const div = el("div");
      div.append(el("dt", term), el("dd", String(value)));
      meta.append(div);
    };
    add("Study date", s.StudyDate);
    add("Accession", s.AccessionNumber);
    add("Images", s.images.length);
    add("Received", when(s.created_at));
  }

  function renderImageControls() {
    const s = state.study;
    const select = $("image-select");
    select.replaceChildren();
    for (const im of s.images) {
      const size = im.rows && im.columns ? `, ${im.columns}×${im.rows}` : "";
      const frames = im.n_frames > 1 ? `, ${im.n_frames} frames` : "";
      const opt = el("option", `Image ${im.index + 1} of ${s.images.length} (${im.Modality || im.kind}${size}${frames})`);
      opt.value = String(im.index);
      select.append(opt);
    }
    select.value = String(state.imageIndex);
    $("image-field").hidden = s.images.length <= 1;

    const options = $("window-options");
    if (!options.childElementCount) {
      for (const [value, label] of WINDOWS) {
        const id = `window-${value}`;
        const input = document.createElement("input");
        input.type = "radio";
        input.name = "window";
        input.id = id;
        input.value = value;
        const lab = el("label", label);
        lab.htmlFor = id;
        options.append(input, lab);
      }
    }
    $(`window-${state.window}`).checked = true;
    $("window-field").hidden = !isCT();

    const im = currentImage();
    const n = im ? im.n_frames : 1;
    const range = $("frame-range");
    range.max = String(Math.max(1, n));
    range.value = String(state.frame + 1);
    $("frame-field").hidden = n <= 1;
    updateFrameOutput();
  }

  function updateFrameOutput() {
    const im = currentImage();
    const n = im ? im.n_frames : 1;
    $("frame-value").textContent = `${state.frame + 1} / ${n}`;
  }

  function imageQuery() {
    const params = new URLSearchParams();
    if (isCT() && state.window !== "default") params.set("window", state.window);
    const im = currentImage();
    if (im && im.n_frames > 1) params.set("frame", String(state.frame));
    const q = params.toString();
    return q ? `?${q}` : "";
  }

  function releaseImage() {
    state.imageSeq += 1;
    if (state.imageUrl) URL.revokeObjectURL(state.imageUrl);
    state.imageUrl = null;
    const img = $("study-image");
    img.removeAttribute("src");
    img.hidden = true;
    $("viewer-placeholder").hidden = false;
    $("viewer-placeholder").textContent = "Loading image…";
    $("viewer-caption").textContent = "";
  }

  // Past the server's image retention the pixels are gone (the PACS keeps them): say so, and
  // where the server can retrieve from the PACS, offer to bring the study back.
  function showReleased(s, im) {
    $("study-image").hidden = true;
    const placeholder = $("viewer-placeholder");
    placeholder.hidden = false;
    placeholder.replaceChildren(
      `This image was released on ${when(im.released_at)}, past this server's image ` +
        "retention; the PACS keeps the study. ",
    );
    if (!$("retrieve-form").hidden && s.StudyInstanceUID) {
      const button = el("button", "Retrieve it from the PACS", "btn");
      button.type = "button";
      button.addEventListener("click", () => retrieveReleased(s, button));
      placeholder.append(button);
    }
    $("viewer-caption").textContent = `Image ${im.index + 1} / ${s.images.length}  ·  released`;
  }

  async function retrieveReleased(s, button) {
    button.disabled = true;
    button.textContent = "Retrieving…";
    try {
      const queued = await api("/v1/studies/retrieve", {
        method: "POST",
        json: { study_instance_uid: s.StudyInstanceUID },
      });
      await Promise.all(queued.jobs.map((id) => jobDone(id)));
      await openStudy(s.id);
    } catch (err) {
      button.disabled = false;
      button.textContent = "Retrieve it from the PACS";
      showError(err, "Retrieve failed");
    }
  }

  async function loadImage() {
    const s = state.study;
    const im = currentImage();
    if (!s || !im) return;
    const seq = ++state.imageSeq;
    if (im.released_at) {
      showReleased(s, im);
      return;
    }
    const stage = $("viewer-stage");
    stage.setAttribute("aria-busy", "true");
    try {
      const r = await api(`/v1/studies/${encodeURIComponent(s.id)}/images/${im.index}${imageQuery()}`, { raw: true });
      const blob = await r.blob();
      if (seq !== state.imageSeq) return; // a newer request won
      const url = URL.createObjectURL(blob);
      const img = $("study-image");
      await new Promise((resolve) => {
        img.onload = resolve;
        img.onerror = resolve;
        img.src = url;
      });
      if (state.imageUrl) URL.revokeObjectURL(state.imageUrl);
      state.imageUrl = url;
      const windowName = isCT() ? WINDOWS.find(([v]) => v === state.window)[1].toLowerCase() : null;
      const frameText = im.n_frames > 1 ? `, frame ${state.frame + 1} of ${im.n_frames}` : "";
      img.alt = `${im.Modality || im.kind} image ${im.index + 1} of ${s.images.length}${frameText}` +
        (windowName ? `, ${windowName} window` : "");
      img.dataset.window = isCT() ? state.window : "";
      img.dataset.frame = String(state.frame);
      img.hidden = false;
      $("viewer-placeholder").hidden = true;
      prepareImage(s, im);
      const size = im.rows && im.columns ? `${im.columns} × ${im.rows}` : "";
      $("viewer-caption").textContent = [
        `Image ${im.index + 1} / ${s.images.length}`,
        im.n_frames > 1 ? `Frame ${state.frame + 1} / ${im.n_frames}` : null,
        windowName ? `Window: ${windowName}` : null,
        size,
      ].filter(Boolean).join("  ·  ");
    } catch (err) {
      if (seq !== state.imageSeq) return;
      $("viewer-placeholder").hidden = false;
      $("viewer-placeholder").textContent = "The image could not be shown.";
      showError(err, "Loading the image");
    } finally {
      if (seq === state.imageSeq) stage.setAttribute("aria-busy", "false");
    }
  }

  // --- study: zoom and pan ----------------------------------------------------------------------

  const ZOOM_MIN = 1;
  const ZOOM_MAX = 8;

  function applyView() {
    const v = state.view;
    $("study-image").style.transform =
      v.zoom === 1 ? "" : `translate(${v.x}px, ${v.y}px) scale(${v.zoom})`;
    $("viewer-stage").dataset.zoomed = String(v.zoom > 1);
    $("zoom-value").textContent = `${Math.round(v.zoom * 100)}%`; // of the fitted size
    $("zoom-out").disabled = v.zoom <= ZOOM_MIN;
    $("zoom-in").disabled = v.zoom >= ZOOM_MAX;
  }

  function resetView() {
    state.view = { zoom: 1, x: 0, y: 0 };
    applyView();
  }

  // The image keeps covering the stage: it moves no further than it overhangs.
  function clampPan() {
    const v = state.view;
    const r = $("viewer-stage").getBoundingClientRect();
    const maxX = (r.width * (v.zoom - 1)) / 2;
    const maxY = (r.height * (v.zoom - 1)) / 2;
    v.x = Math.max(-maxX, Math.min(maxX, v.x));
    v.y = Math.max(-maxY, Math.min(maxY, v.y));
  }

  // Zoom by `factor`, keeping the point (cx, cy) of the stage (from its centre) where it is.
  function zoomBy(factor, cx = 0, cy = 0) {
    const v = state.view;
    const zoom = Math.max(ZOOM_MIN, Math.min(ZOOM_MAX, v.zoom * factor));
    const k = zoom / v.zoom;
    v.x = cx - (cx - v.x) * k;
    v.y = cy - (cy - v.y) * k;
    v.zoom = zoom;
    clampPan();
    applyView();
    return k !== 1;
  }

  function panBy(dx, dy) {
    state.view.x += dx;
    state.view.y += dy;
    clampPan();
    applyView();
  }

  function wireViewer() {
    const stage = $("viewer-stage");
    const fromCentre = (e) => {
      const r = stage.getBoundingClientRect();
      return [e.clientX - (r.left + r.width / 2), e.clientY - (r.top + r.height / 2)];
    };
    // The wheel zooms the image while it can; at the image's limits it scrolls the page, and
    // Ctrl+wheel stays the browser's zoom (a reader with low vision relies on it).
    stage.addEventListener("wheel", (e) => {
      if ($("study-image").hidden || e.ctrlKey || e.metaKey) return;
      if (zoomBy(e.deltaY < 0 ? 1.25 : 0.8, ...fromCentre(e))) e.preventDefault();
    }, { passive: false });
    let drag = null;
    stage.addEventListener("pointerdown", (e) => {
      if (state.view.zoom === 1 || e.button !== 0) return;
      drag = { x: e.clientX, y: e.clientY };
      stage.setPointerCapture(e.pointerId);
    });
    stage.addEventListener("pointermove", (e) => {
      if (!drag) return;
      panBy(e.clientX - drag.x, e.clientY - drag.y);
      drag = { x: e.clientX, y: e.clientY };
    });
    const endDrag = () => { drag = null; };
    stage.addEventListener("pointerup", endDrag);
    stage.addEventListener("pointercancel", endDrag);
    stage.addEventListener("dblclick", resetView);
    stage.addEventListener("keydown", (e) => {
      const step = 40;
      const keys = {
        "+": () => zoomBy(1.25), "=": () => zoomBy(1.25), "-": () => zoomBy(0.8), "0": resetView,
        ArrowLeft: () => panBy(step, 0), ArrowRight: () => panBy(-step, 0),
        ArrowUp: () => panBy(0, step), ArrowDown: () => panBy(0, -step),
      };
      if (!keys[e.key]) return;
      e.preventDefault();
      keys[e.key]();
    });
    $("zoom-in").addEventListener("click", () => zoomBy(1.25));
    $("zoom-out").addEventListener("click", () => zoomBy(0.8));
    $("zoom-reset").addEventListener("click", resetView);
    applyView();
  }

  // The reader is looking at this image: the model computes the image's part of the prompt while
  // idle, so the first question about it is answered as fast as a follow-up. Once per image and
  // frame (a new window is the same image to the model). Best effort: a key that may not ask, or
  // a busy model, changes nothing, and nothing is shown.
  function prepareImage(s, im) {
    const frame = im.n_frames > 1 ? `?frame=${state.frame}` : "";
    const path = `/v1/studies/${encodeURIComponent(s.id)}/images/${im.index}/prepare${frame}`;
    if (state.prepared === path) return;
    state.prepared = path;
    api(path, { method: "POST" }).catch(() => {});
  }

  let frameTimer = null;

  // The image and frame a report is about, in the viewer: the frame asked about, or for a
  // question that named none the middle one, which the model saw (`frame` null).
  function showReportImage(r) {
    const s = state.study;
    const im = s && s.images.find((i) => i.index === r.image_index);
    if (!im) return;
    const frame = Math.min(r.frame ?? Math.floor(im.n_frames / 2), im.n_frames - 1);
    if (state.imageIndex === im.index && state.frame === frame) return;
    if (state.imageIndex !== im.index) resetView(); // another image: fit it
    state.imageIndex = im.index;
    state.frame = frame;
    renderImageControls();
    loadImage();
  }

  function onFrameInput() {
    state.frame = Number($("frame-range").value) - 1;
    updateFrameOutput();
    clearTimeout(frameTimer);
    frameTimer = setTimeout(loadImage, 120);
  }

  // --- study: questions (streamed) ------------------------------------------------------------

  function resetAnswer() {
    const out = $("answer-stream");
    out.replaceChildren();
    out.dataset.state = "idle";
    out.setAttribute("aria-busy", "false");
    setStatus("ask-status", "");
  }

  function parseEvent(block) {
    let event = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith(":")) continue;
      const i = line.indexOf(":");
      const field = i < 0 ? line : line.slice(0, i);
      let value = i < 0 ? "" : line.slice(i + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
    }
    return { event, data: data.join("\n") };
  }

  const STREAM_STATUS = { queue_full: 503, model_not_ready: 503, timeout: 504 };

  // A connection lost mid-answer is a TypeError from the reader: said as what it is
  function streamError(err) {
    if (err instanceof ApiError || !(err instanceof TypeError)) return err;
    return new ApiError(0, "stream_interrupted",
      "the connection to the server was lost while the answer was written; the report list " +
      "shows whether it was stored", null);
  }

  function dialogOpen() {
    return $("sign-dialog").open || $("amend-dialog").open;
  }

  async function ask(event) {
    event.preventDefault();
    const s = state.study;
    if (!s || state.streaming) return;
    const question = typed("question").trim();
    clearError();
    if (!question) {
      fieldError(new Error("type a question first"), "Ask", $("question"));
      return;
    }
    const im = currentImage();
    const body = { question, image_index: im ? im.index : 0 };
    if (im && im.n_frames > 1) body.frame = state.frame;

    const out = $("answer-stream");
    out.replaceChildren();
    out.dataset.state = "streaming";
    out.setAttribute("aria-busy", "true");
    setStatus("answer-announce", "");
    setStatus("ask-status", "Waiting for the model…");
    const controller = new AbortController();
    state.streaming = controller;
    $("ask-stop").hidden = false;
    refocus($("ask-stop"), $("ask-submit")); // Enter on Ask: the keyboard goes on to Stop
    $("ask-submit").disabled = true;
    let report = null;
    let tokens = 0;
    try {
      const r = await api(`/v1/studies/${encodeURIComponent(s.id)}/questions?stream=true`, {
        method: "POST",
        json: body,
        raw: true,
        signal: controller.signal,
      });
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      const handle = (block) => {
        const { event: kind, data } = parseEvent(block);
        if (!data) return;
        const payload = JSON.parse(data);
        if (kind === "token") {
          tokens += 1;
          if (tokens === 1) setStatus("ask-status", "Answering…");
          out.append(payload.text);
          out.dataset.tokens = String(tokens);
        } else if (kind === "report") {
          report = payload;
        } else if (kind === "error") {
          const e = payload.error || {};
          throw new ApiError(STREAM_STATUS[e.code] || 500, e.code || "stream_error",
            e.message || "the answer failed", e.detail ?? null);
        }
      };
      for (;;) {
        const { value, done } = await reader.read();
        if (value) buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          handle(block);
        }
        if (done) break;
      }
      if (buffer.trim()) handle(buffer);
      if (!report) throw new ApiError(502, "stream_incomplete", "the answer stream ended before the report was stored");
      out.replaceChildren(report.answer);
      out.dataset.state = "done";
      setStatus("ask-status", "Answer stored as a draft report.");
      // the answer box is not a live region (it would be read token by token): the whole answer
      // is announced once it is complete
      setStatus("answer-announce", `Answer: ${report.answer}`);
      $("question").value = "";
      state.reports = [report, ...state.reports.filter((x) => x.id !== report.id)];
      renderHistory();
      if (isDirty() || dialogOpen()) {  // the report being edited or signed stays open
        setStatus("ask-status",
          "Answer stored as a draft report, listed in the history. The report you are " +
          "working on stays open: finish it, then open the new one.");
      } else {
        selectReport(report.id);
      }
    } catch (err) {
      out.dataset.state = "error";
      if (state.study !== s) {
        // another study is open now: nothing to say there; its own answer box is empty
      } else if (err && err.name === "AbortError") {
        setStatus("ask-status", "Stopped. Anything shown above is incomplete.");
      } else {
        setStatus("ask-status", "");
        showError(streamError(err), "Asking the model");
      }
      // stored after all? listed; a failure to list says nothing over the question's error
      if (state.study === s) loadReports({ keep: true, quiet: true });
    } finally {
      out.setAttribute("aria-busy", "false");
      state.streaming = null;
      $("ask-submit").disabled = false;
      refocus($("question"), $("ask-stop"));
      $("ask-stop").hidden = true;
    }
  }

  // --- study: reports -------------------------------------------------------------------------

  // `keep`: the report open (and what is typed in it) stays; only the list is read again
  async function loadReports({ keep = false, quiet = false } = {}) {
    const s = state.study;
    if (!s) return;
    try {
      const params = new URLSearchParams({ study_id: s.id, limit: "500" });
      const list = await api(`/v1/reports?${params}`);
      if (state.study !== s) return;
      state.reports = keep
        ? list.data.map((r) => (r.id === state.reportId ? currentReport() || r : r))
        : list.data;
      renderHistory();
      if (keep) return;
      const kept = unsavedReport();
      const pending = kept && state.me && kept.key === state.me.id ? kept.id : null;
      const open = state.reports.some((r) => r.id === pending) ? pending : null;
      if (!state.reports.length) return;
      selectReport(open || state.reports[0].id);
      // the viewer shows the image (and frame) the open report is about: a report beside
      // another image than its own could be read, or signed, as that image's
      showReportImage(currentReport());
    } catch (err) {
      if (!quiet) showError(err, "Loading the reports");
    }
  }

  // Redrawn when reports arrive (also by the 20 s refresh): a reader tabbing through the list
  // stays on the same report's entry.
  function renderHistory() {
    const list = $("history");
    const focused = list.contains(document.activeElement)
      ? document.activeElement.dataset.reportId : null;
    list.replaceChildren();
    $("history-empty").hidden = state.reports.length > 0;
    for (const r of state.reports) {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "history-item";
      button.dataset.reportId = r.id;
      if (r.id === state.reportId) button.setAttribute("aria-current", "true");
      const top = el("span", null, "history-top");
      top.append(el("span", when(r.created_at), "history-time"), badge(r.status));
      const q = el("span", r.question, "history-question");
      const a = el("span", r.text, "history-answer");
      button.append(top, q, a);
      button.addEventListener("click", () => {
        if (isDirty() && !window.confirm(DISCARD_EDITS)) return;
        selectReport(r.id);
        showReportImage(r);
        $("report-title").scrollIntoView({ block: "nearest" });
        $("report-card").focus();
      });
      li.append(button);
      list.append(li);
      if (r.id === focused) button.focus();
    }
  }

  function currentReport() {
    return state.reports.find((r) => r.id === state.reportId) || null;
  }

  const DISCARD_EDITS = "Discard the unsaved changes to this report?";

  function isDirty() {
    const r = currentReport();
    return !!r && r.status === "draft" && $("report-text").value !== r.text;
  }

  // An amendment typed and then cancelled (Cancel, Escape) is kept for this report: Amend opens
  // with it again, and leaving the study or the page asks first, as unsaved draft text does.
  function keepCancelledAmendment() {
    const r = currentReport();
    if (!r || r.id !== state.amending) return;
    const text = $("amend-text").value;
    const reason = $("amend-reason").value;
    const changed = text !== r.text || reason.trim() !== "";
    state.amendDraft = changed ? { id: r.id, text, reason } : null;
    setStatus("amend-status", changed ? "Amendment not signed: Amend opens with your text" : "");
  }

  // typed text that leaving the study (or the page) would lose: a draft's, or an amendment's
  function hasUnsavedText() {
    return isDirty() || !!state.amendDraft;
  }

  function unsavedReport() {
    return storedJson(UNSAVED_STORAGE);
  }

  // The text typed into draft `r` before a sign-out, back in the editor: only onto the version
  // it was typed over (a draft someone changed meanwhile is shown as it is now, and said so)
  function restoreUnsaved(r) {
    const kept = unsavedReport();
    if (!kept) return;
    if (!state.me || kept.key !== state.me.id) {  // another reader at this workstation
      sessionStorage.removeItem(UNSAVED_STORAGE);
      return;
    }
    if (kept.id !== r.id) return;
    sessionStorage.removeItem(UNSAVED_STORAGE);
    if (kept.version === r.version) {
      $("report-text").value = kept.text;
      setStatus("report-status", "Unsaved changes (restored from before you were signed out)");
    } else {
      showError(new Error("the text you had not saved before you were signed out was not " +
        "restored: this report was changed meanwhile"), "Restoring your text");
    }
  }

  function selectReport(id) {
    clearPrintSheet();
    state.reportId = id;
    const r = currentReport();
    for (const b of $("history").querySelectorAll(".history-item")) {
      if (b.dataset.reportId === id) b.setAttribute("aria-current", "true");
      else b.removeAttribute("aria-current");
    }
    const card = $("report-card");
    card.hidden = !r;
    if (!r) return;
    card.tabIndex = -1;
    const b = $("report-badge");
    b.dataset.status = r.status;
    b.textContent = STATUS_TEXT[r.status];
    $("report-question").textContent = r.question;
    $("model-answer").textContent = r.answer || "(empty answer)";
    // an answer its token limit stopped may end mid-sentence: said before anyone signs it
    $("answer-cut").hidden = r.finish_reason !== "length";
    const n = r.tokens.completion;
    $("answer-cut").textContent =
      `The model stopped at its length limit (${n} token${n === 1 ? "" : "s"}): this answer ` +
      "may be incomplete.";
    const signed = SIGNED.has(r.status);
    $("report-edit").hidden = signed;
    $("report-final").hidden = !signed;
    const editor = can("report.edit");
    $("report-text").readOnly = !editor;
    $("report-save").hidden = !editor;
    $("report-sign").hidden = !can("report.sign");
    $("report-amend").hidden = !can("report.sign");
    const note = $("report-role-note");
    note.hidden = editor;
    note.textContent = editor
      ? ""
      : `Your key's role (${state.me.role}) reads reports; a radiologist edits and signs them.`;
    setStatus("report-status", "");
    setStatus("amend-status", "");
    if (signed) {
      $("report-final-text").textContent = r.text;
      const by = $("report-signed-by");
      const verb = r.status === "amended" ? "Amended and signed" : "Signed";
      by.replaceChildren(
        el("strong", `${verb} ${when(r.signed_at) || "(date unknown)"}`),
        " · changed only by an amendment · by ",
        el("span", r.signed_by_name || `API key ${r.signed_by || "unknown"}`, "signer"),
      );
      loadVersions(r);
    } else {
      $("report-text").value = r.text;
      restoreUnsaved(r);
    }
    const prov = [
      `Model ${r.model}`,
      r.variant && r.variant !== r.model ? `variant ${r.variant}` : null,
      `quantization ${r.quantization}`,
      r.model_version ? `model version ${r.model_version}` : null,
      // which weights: the digest's start (the API has all of it)
      r.model_weights ? `weights ${r.model_weights.slice(0, 19)}…` : null,
      `${Math.round(r.latency_ms)} ms`,
      `${r.tokens.completion} token${r.tokens.completion === 1 ? "" : "s"}`,
      r.image_index !== null && r.image_index !== undefined ? `image ${r.image_index + 1}` : null,
      r.frame !== null && r.frame !== undefined ? `frame ${r.frame + 1}` : null,
      `asked ${when(r.created_at)}`,
      edited(r) ? `edited ${when(r.updated_at)}` : null,
    ].filter(Boolean);
    $("report-provenance").textContent = prov.join(" · ");
  }

  // The signed texts an amended report replaced (and why), from its history; hidden for a
  // report signed once. A reply for a report no longer shown is dropped.
  async function loadVersions(r) {
    $("report-versions").hidden = true;
    state.amendments = null; // what was read of another version does not print with this one
    if (r.status !== "amended") return;
    let history;
    try {
      history = await api(`/v1/reports/${encodeURIComponent(r.id)}/history`);
    } catch (err) {
      showError(err, "Reading the report's history");
      return;
    }
    if (state.reportId !== r.id) return;
    const list = $("report-versions-list");
    list.replaceChildren();
    const signed = history.data.filter((e) => SIGNED.has(e.previous_status));
    // for the printout: this version's replaced texts
    state.amendments = { id: r.id, version: r.version, entries: signed.slice().reverse() };
    for (const e of signed.reverse()) {
      const li = el("li");
      li.append(
        el("strong", `${STATUS_TEXT[e.previous_status]} text, replaced ${when(e.edited_at)}`),
        e.reason ? ` · reason: ${e.reason}` : "",
        el("span", e.previous_text, "version-text"),
      );
      list.append(li);
    }
    $("report-versions-summary").textContent =
      `Earlier signed versions (${signed.length})`;
    $("report-versions").hidden = signed.length === 0;
  }

  function edited(r) {
    if (!r.updated_at) return false;
    const t = (iso) => new Date(/(?:[zZ]|[+-]\d\d:?\d\d)$/.test(iso) ? iso : `${iso}Z`).getTime();
    return t(r.updated_at) - t(r.created_at) > 1000;
  }

  // A change to report `r` as this page last read it (If-Match: its version). When someone
  // else changed it meanwhile the server refuses (412); the list then takes their version and
  // the editor keeps what was typed, so nothing is signed unseen and nothing typed is lost.
  async function patchReport(r, json) {
    const path = `/v1/reports/${encodeURIComponent(r.id)}`;
    try {
      return await api(path, { method: "PATCH", json, ifMatch: r.version });
    } catch (err) {
      if (err.status === 412 || (err.status === 409 && err.code === "report_changed")) {
        const fresh = await api(path).catch(() => null);
        if (fresh) changedMeanwhile(fresh, json.text ?? $("report-text").value);
      }
      throw err;
    }
  }

  // Someone else changed report `fresh` while this page held an older version. A draft stays
  // in the editor with what was typed (the list shows their version); a report they signed
  // is shown signed, and what was typed here comes back in the amendment dialog.
  function changedMeanwhile(fresh, typedText) {
    keepReport(fresh);
    if (state.reportId !== fresh.id || !SIGNED.has(fresh.status)) return;
    const failedAmendment = state.amendDraft && state.amendDraft.id === fresh.id;
    if (typedText !== fresh.text && !failedAmendment) {
      state.amendDraft = { id: fresh.id, text: typedText, reason: "" };
    }
    selectReport(fresh.id);
  }

  // `updated` in the history list, in place of its earlier version
  function keepReport(updated) {
    state.reports = state.reports.map((r) => (r.id === updated.id ? updated : r));
    renderHistory();
  }

  // `updated`, as the server answered a change made from the editor holding `sent`: shown,
  // unless another report was opened meanwhile; text typed while the request ran stays
  function replaceReport(updated, sent) {
    keepReport(updated);
    if (state.reportId !== updated.id) return;
    const now = $("report-text").value;
    selectReport(updated.id);
    if (updated.status === "draft" && now !== sent) {
      $("report-text").value = now;
      setStatus("report-status", "Unsaved changes");
    }
  }

  // Save and Sign wait for each other: a second change would be refused as "someone else's"
  function busy(on) {
    if (on) state.busyFocus = document.activeElement;
    $("report-save").disabled = on;
    $("report-sign").disabled = on;
    if (!on) refocus(state.busyFocus);
  }

  async function saveReport() {
    const r = currentReport();
    if (!r) return;
    clearError();
    busy(true);
    setStatus("report-status", "Saving…");
    const sent = $("report-text").value;
    try {
      const updated = await patchReport(r, { text: typed("report-text") });
      replaceReport(updated, sent);
      if (!isDirty()) setStatus("report-status", "Draft saved.");
    } catch (err) {
      // what is typed stays in the editor (after a 412, beside the other reader's version)
      setStatus("report-status", isDirty() ? "Unsaved changes" : "");
      showError(err, "Saving the report");
    } finally {
      busy(false);
    }
  }

  function askToSign() {
    const r = currentReport();
    if (!r) return;
    clearError();
    if (!$("report-text").value.trim()) {
      fieldError(new Error("an empty report cannot be signed; write the report text first"), "Sign", $("report-text"));
      return;
    }
    state.signing = r.id;
    // what is signed is what is seen: the viewer goes back to the report's own image and frame
    // (another may have been picked since it was asked), and the dialog names them
    showReportImage(r);
    const where = [
      r.image_index !== null && r.image_index !== undefined ? `image ${r.image_index + 1}` : null,
      r.frame !== null && r.frame !== undefined ? `frame ${r.frame + 1}` : null,
    ].filter(Boolean).join(", ");
    $("sign-dialog-report").textContent = `Question: ${r.question}` + (where ? ` (about ${where})` : "");
    $("sign-dialog").returnValue = "";
    $("sign-dialog").showModal();
  }

  // The report on screen, if it is still the one dialog `kind` was opened for
  function stillShown(id, kind) {
    const r = currentReport();
    if (r && r.id === id) return r;
    showError(new Error(`another report is shown now than the one the ${kind} dialog was ` +
      `opened for: nothing was ${kind === "sign" ? "signed" : "amended"}`), kind === "sign"
      ? "Sign" : "Amend");
    return null;
  }

  async function signReport() {
    const r = stillShown(state.signing, "sign");
    if (!r) return;
    busy(true);
    setStatus("report-status", "Signing…");
    try {
      const sent = $("report-text").value;
      const text = typed("report-text");
      const json = text !== r.text ? { text, status: "final" } : { status: "final" };
      const updated = await patchReport(r, json);
      replaceReport(updated, sent);
      setStatus("report-status", "");
      setStatus("ask-status", "Report signed.");
      $("report-title").focus();
    } catch (err) {
      // what is typed stays in the editor (after a 412, beside the other reader's version)
      setStatus("report-status", isDirty() ? "Unsaved changes" : "");
      showError(err, "Signing the report");
    } finally {
      busy(false);
    }
  }

  function askToAmend() {
    const r = currentReport();
    if (!r) return;
    clearError();
    // what a failed amendment of this report held comes back, not the signed text again
    const kept = state.amendDraft && state.amendDraft.id === r.id ? state.amendDraft : null;
    $("amend-text").value = kept ? kept.text : r.text;
    checkAmendText();
    $("amend-reason").value = kept ? kept.reason : "";
    state.amending = r.id;
    $("amend-dialog").returnValue = "";
    $("amend-dialog").showModal();
  }

  // Blank text would be refused by the server after the dialog closed: the dialog says so and
  // stays open (a text area has no `pattern`; the reason's input has one).
  function checkAmendText() {
    const blank = !$("amend-text").value.trim();
    $("amend-text").setCustomValidity(blank ? "the corrected text cannot be empty" : "");
  }

  async function amendReport() {
    const r = stillShown(state.amending, "amend");
    if (!r) return;
    $("report-amend").disabled = true;
    setStatus("amend-status", "Signing the amendment…");
    state.amendDraft = { id: r.id, text: typed("amend-text"), reason: typed("amend-reason") };
    try {
      const { text, reason } = state.amendDraft;
      const updated = await patchReport(r, { text, status: "amended", reason });
      state.amendDraft = null;
      replaceReport(updated, updated.text);
      setStatus("ask-status", "Report amended.");
      $("report-title").focus();
    } catch (err) {
      setStatus("amend-status", "");
      showError(err, "Amending the report");
    } finally {
      $("report-amend").disabled = false;
      refocus($("report-amend"));
    }
  }

  // --- printing a signed report ----------------------------------------------------------------

  // The sheet prints only while it holds the report shown (`filled`): after the print, or once
  // another report, study or user is shown, the page prints as it is instead.
  function clearPrintSheet() {
    $("print-sheet").classList.remove("filled");
  }

  // The signed report on a sheet of its own (study, question, text, who signed and when, the
  // model that drafted it), then the browser's print dialog; the page's CSS prints only it.
  async function printReport() {
    const r = currentReport();
    const s = state.study;
    if (!r || !s || !SIGNED.has(r.status)) return;
    const read = () => state.amendments && state.amendments.id === r.id &&
      state.amendments.version === r.version;
    if (r.status === "amended" && !read()) {
      await loadVersions(r); // printed before the history was read: it is read first
      const still = currentReport();
      if (!still || still.id !== r.id || !read()) return; // not printed without it
    }
    const fields = $("print-fields");
    fields.replaceChildren();
    const add = (term, value) => {
      if (value === null || value === undefined || value === "") return;
      fields.append(el("dt", term), el("dd", String(value)));
    };
    add("Study", `${studyLabel(s)} study`);
    add("Study date", s.StudyDate);
    add("Accession", s.AccessionNumber);
    add("Study UID", s.StudyInstanceUID);
    add("Image", r.image_index !== null && r.image_index !== undefined ? r.image_index + 1 : null);
    add("Frame", r.frame !== null && r.frame !== undefined ? r.frame + 1 : null);
    add("Status", STATUS_TEXT[r.status]);
    // an amended report says when and why each signed text was replaced (newest first)
    const amendments = read() ? state.amendments.entries : [];
    for (const e of amendments) {
      add("Amended", `${when(e.edited_at)}${e.reason ? `, reason: ${e.reason}` : ""}`);
    }
    $("print-question").textContent = r.question;
    $("print-text-title").textContent = r.status === "amended" ? "Report (amended)" : "Report";
    $("print-text").textContent = r.text;
    const verb = r.status === "amended" ? "Amended and signed" : "Signed";
    $("print-signed").textContent =
      `${verb} by ${r.signed_by_name || `API key ${r.signed_by}`}, ${when(r.signed_at)}`;
    $("print-provenance").textContent =
      `Drafted by the model ${r.variant || r.model} (quantization ${r.quantization}` +
      `${r.model_version ? `, version ${r.model_version}` : ""}` +
      `${r.model_weights ? `, weights ${r.model_weights.slice(0, 23)}` : ""}) and reviewed by the ` +
      `radiologist who signed it. Printed ${when(new Date().toISOString())}.`;
    // the server shows no patient names: the accession number (or study UID) links the sheet
    // to the patient's order
    const demo = r.model === "demo" || r.variant === "demo";
    $("print-warning").textContent =
      "This sheet carries no patient name: file it by accession number or study UID." +
      (demo ? " Drafted by the synthetic demo model: not for clinical use." : "");
    $("print-sheet").classList.add("filled");
    window.print();
  }

  // --- study: deletion (admins) --------------------------------------------------------------

  function askToDelete() {
    if (!state.study) return;
    clearError();
    $("delete-dialog").returnValue = "";
    $("delete-dialog").showModal();
  }

  async function deleteStudy() {
    const s = state.study;
    if (!s) return;
    $("study-delete").disabled = true;
    try {
      await api(`/v1/studies/${encodeURIComponent(s.id)}`, { method: "DELETE" });
      state.notice = `${studyLabel(s)} study deleted.`;
      location.hash = "#/"; // back to the worklist, which says so
    } catch (err) {
      showError(err, "Deleting the study");
    } finally {
      $("study-delete").disabled = false;
    }
  }

  // --- wiring ---------------------------------------------------------------------------------

  function wire() {
    wireViewer();
    $("signin-form").addEventListener("submit", signIn);
    $("sign-out").addEventListener("click", () => {
      // the typed text is kept for after the next sign-in in this tab, but said first
      if (isDirty() && !window.confirm("Sign out? Your unsaved report text comes back when you sign in again with your key in this tab.")) return;
      if (!isDirty() && state.amendDraft && !window.confirm("Sign out? Your unsigned amendment is discarded.")) return;
      signOut();
      // every tab of this browser: on a shared reading-room PC the next reader must not go on
      // under this one's key in a tab left open
      if (tabs) tabs.postMessage({ signedOut: true });
    });
    if (tabs) tabs.addEventListener("message", (e) => {
      if (e.data && e.data.signedOut && state.key) signOut("You signed out in another tab of this browser.");
    });
    $("upload-form").addEventListener("submit", upload);
    $("import-form").addEventListener("submit", importMedia);
    $("retrieve-form").addEventListener("submit", retrieve);
    scheduleWorklistRefresh();
    $("filter-modality").addEventListener("change", () => loadWorklist(false));
    $("filter-report").addEventListener("change", () => loadWorklist(false));
    // Enter (or Find) submits the form and looks the accession number up; clearing the field
    // lists all again
    $("filter-accession").addEventListener("input", () => {
      if (!$("filter-accession").value) loadWorklist(false);
    });
    $("filter-date-from").addEventListener("change", () => loadWorklist(false));
    $("filter-date-to").addEventListener("change", () => loadWorklist(false));
    $("filter-form").addEventListener("submit", (e) => {
      e.preventDefault();
      loadWorklist(false);
    });
    $("worklist-refresh").addEventListener("click", () => loadWorklist(false));
    $("worklist-more").addEventListener("click", () => loadWorklist(true));
    $("image-select").addEventListener("change", () => {
      state.imageIndex = Number($("image-select").value);
      state.frame = 0;
      resetView(); // another image: fit it (a window or frame change keeps the view)
      renderImageControls();
      loadImage();
    });
    $("window-options").addEventListener("change", (e) => {
      if (e.target && e.target.name === "window") {
        state.window = e.target.value;
        loadImage();
      }
    });
    $("frame-range").addEventListener("input", onFrameInput);
    $("ask-form").addEventListener("submit", ask);
    $("question").addEventListener("keydown", (e) => {
      // Ctrl/Cmd+Enter asks; Enter alone makes a new line.
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("ask-form").requestSubmit();
    });
    $("ask-stop").addEventListener("click", () => state.streaming && state.streaming.abort());
    $("report-save").addEventListener("click", saveReport);
    $("report-sign").addEventListener("click", askToSign);
    $("report-text").addEventListener("input", () => {
      setStatus("report-status", isDirty() ? "Unsaved changes" : "");
    });
    $("report-amend").addEventListener("click", askToAmend);
    $("amend-text").addEventListener("input", checkAmendText);
    $("report-print").addEventListener("click", printReport);
    window.addEventListener("afterprint", clearPrintSheet);
    $("amend-dialog").addEventListener("close", () => {
      if ($("amend-dialog").returnValue === "confirm") amendReport();
      else {
        keepCancelledAmendment();
        $("report-amend").focus();
      }
    });
    $("study-delete").addEventListener("click", askToDelete);
    $("delete-dialog").addEventListener("close", () => {
      if ($("delete-dialog").returnValue === "confirm") deleteStudy();
    });
    $("sign-dialog").addEventListener("close", () => {
      if ($("sign-dialog").returnValue === "confirm") signReport();
      else $("report-sign").focus();
    });
    window.addEventListener("hashchange", () => {
      if (hasUnsavedText() && !window.confirm(DISCARD_EDITS)) {
        history.replaceState(null, "", state.shownHash || "#/"); // stay, with the text as typed
        return;
      }
      state.amendDraft = null;
      if (state.streaming) state.streaming.abort();
      route();
    });
    window.addEventListener("beforeunload", (e) => {
      if (hasUnsavedText()) e.preventDefault();
    });
  }

  wire();
  restoreFilters();
  refreshModel();
  route();
})();
