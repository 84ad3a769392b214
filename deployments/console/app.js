// Infer-OS Serve console: chat (streamed over SSE), live charts from GET /v1/metrics every
// second, and the policy switch (POST /v1/policy with the admin token). Plain browser JS.
"use strict";

const $ = (id) => document.getElementById(id);
const LEVEL_COLORS = { L0: "#4fa3ff", L1: "#3ecf8e", L2: "#f5a623", L3: "#ff6b6b" };
const charts = {
  tps: new LineChart($("chart-tps"), [{ name: "tokens/s", color: "#4fa3ff" }]),
  ttft: new LineChart($("chart-ttft"), [
    { name: "p50", color: "#3ecf8e" }, { name: "p95", color: "#f5a623" },
  ]),
  kv: new LineChart($("chart-kv"), Object.entries(LEVEL_COLORS).map(([name, color]) => ({ name, color })),
    { format: fmtBytes }),
};
let modelName = null;
let policyVersion = null;  // the version the charts last saw

function fmtBytes(v) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${v.toFixed(v >= 100 || i === 0 ? 0 : 1)} ${units[i]}`;
}

function remember(id) {  // tokens survive a reload, in this browser only
  const el = $(id);
  el.value = localStorage.getItem(`inferos.${id}`) || "";
  el.addEventListener("change", () => localStorage.setItem(`inferos.${id}`, el.value));
}

function authHeaders(id) {
  const key = $(id).value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function errorText(resp) {
  try { return (await resp.json()).error.message; } catch { return `${resp.status} ${resp.statusText}`; }
}

// --- chat --------------------------------------------------------------------------------
function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  $("transcript").appendChild(div);
  $("transcript").scrollTop = $("transcript").scrollHeight;
  return div;
}

const conversation = [];

async function sendChat(ev) {
  ev.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt || !modelName) return;
  $("prompt").value = "";
  $("send").disabled = true;
  conversation.push({ role: "user", content: prompt });
  addMessage("user", prompt);
  const out = addMessage("assistant", "");
  out.dataset.chunks = "0";
  out.dataset.done = "false";
  const started = performance.now();
  let firstAt = null, text = "";
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders("api-key") },
      body: JSON.stringify({
        model: modelName, messages: conversation, stream: true,
        max_tokens: Number($("max-tokens").value) || 64,
      }),
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    const reader = resp.body.getReader(), decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {  // one SSE event per blank line
        const event = buf.slice(0, cut); buf = buf.slice(cut + 2);
        const data = event.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const piece = chunk.choices?.[0]?.delta?.content;
        if (piece) {
          firstAt ??= performance.now();
          text += piece;
          out.textContent = text;
          out.dataset.chunks = String(Number(out.dataset.chunks) + 1);
          $("transcript").scrollTop = $("transcript").scrollHeight;
        }
      }
    }
    conversation.push({ role: "assistant", content: text });
    const meta = document.createElement("span");
    meta.className = "meta";
    const ttft = firstAt ? ((firstAt - started) / 1000).toFixed(2) : "–";
    meta.textContent = `TTFT ${ttft} s · ${((performance.now() - started) / 1000).toFixed(2)} s total · ${out.dataset.chunks} chunks`;
    out.appendChild(meta);
  } catch (e) {
    out.className = "msg error";
    out.textContent = `error: ${e.message}`;
    conversation.pop();
  } finally {
    out.dataset.done = "true";
    $("send").disabled = false;
  }
}

// --- policy ------------------------------------------------------------------------------
function showPolicy(p) {
  $("current-policy").textContent =
    `${p.kv_profile} · ${p.pd_mode} · speculation ${p.speculation ? "on" : "off"} · v${p.version}`;
  $("current-policy").dataset.profile = p.kv_profile;
}

async function applyPolicy(ev) {
  ev.preventDefault();
  const status = $("policy-status");
  const body = {
    kv_profile: $("kv-profile").value, pd_mode: $("pd-mode").value,
    speculation: $("speculation").checked,
  };
  $("apply").disabled = true;
  try {
    const resp = await fetch("/v1/policy", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders("admin-token") },
      body: JSON.stringify(body),
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    const p = await resp.json();
    showPolicy(p);
    status.className = "ok";
    status.textContent = `applied at ${new Date().toLocaleTimeString()} (version ${p.version})`;
  } catch (e) {
    status.className = "bad";
    status.textContent = `refused: ${e.message}`;
  } finally {
    $("apply").disabled = false;
  }
}

// --- live metrics ------------------------------------------------------------------------
function memoryText(m) {  // inferos:memory_bytes{kind} of one replica
  if (m.rss === undefined) return "";
  return `${fmtBytes(m.rss)} (weights ${fmtBytes(m.weights)}, KV ${fmtBytes(m.kv_used)} of ${fmtBytes(m.kv_budget)})`;
}

function renderReplicas(replicas) {
  const rows = Object.entries(replicas).map(([key, r]) =>
    `<tr><td>${key.slice(0, 24)}</td><td>${(100 * r.utilisation).toFixed(0)} %</td>` +
    `<td>${r.num_running}</td><td>${r.num_waiting}</td><td>${(100 * r.kv_cache_usage).toFixed(1)} %</td>` +
    `<td>${memoryText(r.memory_bytes || {})}</td></tr>`);
  $("replicas").tBodies[0].innerHTML = rows.join("");
}

async function poll() {
  try {
    const resp = await fetch("/v1/metrics", { headers: authHeaders("api-key") });
    if (!resp.ok) throw new Error(await errorText(resp));
    const m = await resp.json();
    charts.tps.push([m.tokens_per_s]);
    charts.ttft.push([m.ttft_s.p50, m.ttft_s.p95]);
    const levels = Object.keys(LEVEL_COLORS);
    charts.kv.push(levels.map((lv) => m.kv_bytes_per_level[lv]));
    $("tps-now").textContent = m.tokens_per_s.toFixed(1);
    $("ttft-now").textContent = m.ttft_s.p50 === null ? "" : `${m.ttft_s.p50.toFixed(3)} / ${m.ttft_s.p95.toFixed(3)}`;
    $("kv-now").textContent = fmtBytes(levels.reduce((a, lv) => a + m.kv_bytes_per_level[lv], 0));
    renderReplicas(m.replicas);
    if (policyVersion !== null && m.policy.version !== policyVersion) {
      // a switch (from here or elsewhere): mark it on every chart, so A/B is visible
      Object.values(charts).forEach((c) => c.mark(m.policy.kv_profile));
    }
    policyVersion = m.policy.version;
    showPolicy(m.policy);
  } catch (e) {
    $("tps-now").textContent = `metrics: ${e.message}`;
  }
}

async function checkHealth() {
  const pill = $("health");
  try {
    const resp = await fetch("/v1/health", { headers: authHeaders("api-key") });
    const h = await resp.json();
    pill.textContent = `${h.status} · ${h.replicas.prefill} prefill / ${h.replicas.decode} decode`;
    pill.className = `pill ${resp.ok ? "ok" : "bad"}`;
  } catch (e) {
    pill.textContent = "unreachable";
    pill.className = "pill bad";
  }
}

async function init() {
  remember("api-key");
  remember("admin-token");
  $("chat-form").addEventListener("submit", sendChat);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("policy-form").addEventListener("submit", applyPolicy);
  const resp = await fetch("/v1/models", { headers: authHeaders("api-key") });
  if (resp.ok) {
    modelName = (await resp.json()).data[0].id;
    $("model").textContent = modelName;
  } else {
    $("model").textContent = `models: ${await errorText(resp)}`;
  }
  const p = await (await fetch("/v1/policy", { headers: authHeaders("api-key") })).json();
  $("kv-profile").value = p.kv_profile;
  $("pd-mode").value = p.pd_mode;
  $("speculation").checked = p.speculation;
  showPolicy(p);
  checkHealth();
  poll();
  setInterval(poll, 1000);
  setInterval(checkHealth, 5000);
}

init();
