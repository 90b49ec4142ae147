// The dashboard's one script: fetches the charts (SVG drawn by the daemon) with the bearer token and places
// them in the page. The token is typed once and kept in sessionStorage: for this tab, gone when it closes.
// A daemon without tokens answers without one, and the token form never shows. Served as a file, never
// inline: the page's Content-Security-Policy allows no inline script.
"use strict";

(function () {
  const KEY = "aggregator.token";
  const REFRESH_MS = 30000;
  const $ = (id) => document.getElementById(id);
  const range = $("range");
  const login = $("login");
  const main = $("charts");
  const status = $("status");
  const charts = Array.from(document.querySelectorAll("[data-chart]"));
  let generation = 0; // a load started later wins over one still in flight
  let timer = null;

  function setState(state) {
    document.body.dataset.state = state;
  }

  function query() {
    const params = new URLSearchParams();
    const utc = (value) => (value.length === 16 ? value + ":00" : value) + "Z"; // datetime-local is UTC here
    if (range.since.value) {
      params.set("since", utc(range.since.value));
    } else {
      params.set("last", range.last.value);
    }
    if (range.until.value) {
      params.set("until", utc(range.until.value));
    }
    return params.toString();
  }

  function message(text) {
    const p = document.createElement("p");
    p.className = "error";
    p.textContent = text;
    return p;
  }

  async function detail(response) {
    try {
      const body = await response.json();
      return typeof body.detail === "string" ? body.detail : response.statusText;
    } catch (_) {
      return response.statusText;
    }
  }

  // One chart: its SVG parsed as XML (never as HTML) and adopted into the page. Returns the HTTP status.
  async function fetchChart(element, params, token) {
    const headers = token ? { Authorization: "Bearer " + token } : {};
    let response;
    try {
      response = await fetch("charts/" + element.dataset.chart + ".svg?" + params,
                             { headers: headers, cache: "no-store", credentials: "omit" });
    } catch (error) {
      element.replaceChildren(message("The daemon did not answer: " + error.message));
      element.setAttribute("aria-busy", "false");
      return { status: 0 };
    }
    element.setAttribute("aria-busy", "false");
    if (response.status === 401 || response.status === 403) {
      return { status: response.status, detail: await detail(response) };
    }
    if (!response.ok) {
      element.replaceChildren(message(response.status + ": " + (await detail(response))));
      return { status: response.status };
    }
    const parsed = new DOMParser().parseFromString(await response.text(), "image/svg+xml");
    const root = parsed.documentElement;
    if (root.localName !== "svg" || parsed.getElementsByTagName("parsererror").length) {
      element.replaceChildren(message("The chart could not be read."));
      return { status: 0 };
    }
    element.replaceChildren(document.importNode(root, true));
    return { status: response.status };
  }

  function askForToken(text) {
    main.hidden = true;
    login.hidden = false;
    $("forget").hidden = true;
    $("login-error").textContent = text;
    status.textContent = "";
    $("token").focus();
    setState("login");
  }

  async function load() {
    const mine = ++generation;
    const token = sessionStorage.getItem(KEY);
    const params = query();
    setState("loading");
    status.textContent = "Loading\u2026";
    // The first chart alone: a refused token is found with one request, not four.
    const first = await fetchChart(charts[0], params, token);
    if (mine !== generation) return;
    if (first.status === 401 || first.status === 403) {
      if (token) sessionStorage.removeItem(KEY);
      askForToken(token ? "The token was refused: " + first.detail : "");
      return;
    }
    login.hidden = true;
    main.hidden = false;
    $("forget").hidden = !token;
    const rest = await Promise.all(charts.slice(1).map((element) => fetchChart(element, params, token)));
    if (mine !== generation) return;
    const refused = rest.find((result) => result.status === 401 || result.status === 403);
    if (refused) {
      askForToken("The token was refused: " + refused.detail);
      return;
    }
    status.textContent = "Updated " + new Date().toISOString().slice(0, 19).replace("T", " ") + " UTC";
    setState("ready");
  }

  login.addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, $("token").value.trim());
    $("token").value = "";
    load();
  });

  range.addEventListener("submit", (event) => {
    event.preventDefault();
    load();
  });

  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    charts.forEach((element) => element.replaceChildren());
    askForToken("");
  });

  $("auto").addEventListener("change", (event) => {
    clearInterval(timer);
    // Not while the token form shows: a refresh would clear what is being typed.
    timer = event.target.checked ? setInterval(() => login.hidden && load(), REFRESH_MS) : null;
  });

  load();
})();
