// loc3r-serve page: pick or upload a video, ask, watch the answer stream, see the pose on a map.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const state = { model: null, history: {}, layout: {}, located: {}, objectUrl: null };

function headers(extra = {}) {
  const key = $("api-key").value || sessionStorage.getItem("loc3r-key");
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers) });
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new Error(body.error ? body.error.message : `${response.status} ${response.statusText}`);
  }
  return response;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function loadModel() {
  const health = await (await fetch("/health")).json();
  state.model = health.model.id;
  $("model").textContent = `${health.model.id} · ${health.model.backend}`;
  $("key-box").hidden = !health.auth;
  if (health.warning) {
    $("banner").hidden = false;
    $("banner").textContent = (health.model.random_weights ? "RANDOM WEIGHTS: " : "UNTRAINED HEADS: ") + health.warning;
  }
}

async function loadVideos(select) {
  const list = await (await api("/v1/videos")).json();
  const scenes = await (await api("/v1/scenes")).json();
  const box = $("videos");
  const named = scenes.data.map((scene) => {  // scenes named with loc3r-scene add: their KV is stored
    const option = document.createElement("option");
    option.value = scene.id;
    option.dataset.scene = "1";
    option.textContent = `${scene.id} (scene${scene.resident ? ", resident" : ""})`;
    return option;
  });
  box.replaceChildren(...named, ...list.data.map((video) => {
    const option = document.createElement("option");
    option.value = video.url;
    option.textContent = video.source === "upload" ? `${video.filename} (upload)` : `${video.id} (${video.source})`;
    return option;
  }));
  if (select) box.value = select;
  if (list.media_scan && list.media_scan.bounded) setStatus(`media folder: ${list.media_scan.bounded}`);
  await showVideo();
}

async function showVideo() {
  const url = $("videos").value;
  const live = url.startsWith("live:");
  const scene = isScene();
  $("live-note").hidden = !live;
  $("player").hidden = live || scene || !url;
  if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
  state.objectUrl = null;
  if (!url || live || scene) return;
  const path = `/v1/videos/content?url=${encodeURIComponent(url)}`;
  if (headers().Authorization) {  // a <video src> cannot send the key: fetch the bytes instead
    state.objectUrl = URL.createObjectURL(await (await api(path)).blob());
    $("player").src = state.objectUrl;
  } else {
    $("player").src = path;
  }
  drawMap(url);
}

async function upload(file) {
  const form = new FormData();
  form.append("file", file);
  setStatus(`uploading ${file.name}…`);
  try {
    const info = await (await api("/v1/videos", { method: "POST", body: form })).json();
    setStatus(`uploaded ${file.name} (${info.frames} frames)`);
    await loadVideos(info.url);
  } catch (error) {
    setStatus(error.message, true);
  }
}

// Server-sent events of a POSTed request: fetch + a stream reader (EventSource only GETs).
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

async function ask(event) {
  event.preventDefault();
  const url = $("videos").value;
  const question = $("question").value.trim();
  if (!url || !question) return;
  $("ask").disabled = true;
  $("answer").textContent = "";
  setStatus("waiting for the model…");
  const started = performance.now();
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        model: state.model,
        stream: true,
        max_tokens: 64,
        messages: [{ role: "user", content: isScene() ? question : [{ type: "video_url", video_url: { url } }, { type: "text", text: question }] }],
        loc3r: { bev: true, situation: $("situation").value, ...(isScene() ? { scene: url } : {}) },
      }),
    });
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        if (!$("answer").textContent) setStatus(`first token after ${((performance.now() - started) / 1000).toFixed(2)} s`);
        $("answer").textContent += delta.content;
      }
      if (chunk.loc3r && chunk.loc3r.progress) {
        const { stage, done, total } = chunk.loc3r.progress;
        setStatus(`${stage} ${done}/${total}… (${((performance.now() - started) / 1000).toFixed(1)} s)`);
      } else if (chunk.loc3r) {
        showResult(url, chunk.loc3r);
      }
    }
  } catch (error) {
    setStatus(error.message, true);
  } finally {
    $("ask").disabled = false;
  }
}

const isScene = () => { const option = $("videos").selectedOptions[0]; return Boolean(option && option.dataset.scene); };

// Every situation's pose on the map at once, numbered, with sigma and confidence (no answer decoded).
async function locate(event) {
  event.preventDefault();
  const url = $("videos").value;
  const situations = $("situations").value.split("\n").map((line) => line.trim()).filter(Boolean);
  if (!url || !situations.length) return;
  $("locate").disabled = true;
  setStatus("locating…");
  try {
    const response = await api("/v1/locate", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ scene: url, situations }),
    });
    const result = await response.json();
    const note = result.poses.length ? result.poses[0].confidence_note || "" : "";
    state.located[url] = result.poses.filter((p) => [p.position.x, p.position.y, p.position.sigma, p.orientation.theta_rad].every(finite));
    $("located-list").replaceChildren(...result.poses.map((p) => {
      const item = document.createElement("li");
      const { x, y, sigma } = p.position;
      item.textContent = [x, y, sigma].every(finite)
        ? `${p.situation || "(no situation)"}: x ${x.toFixed(2)} m, y ${y.toFixed(2)} m, σ ${sigma.toFixed(2)} m, ` +
          `heading ${p.orientation.theta_deg.toFixed(0)}°, ${confidenceText(p.position, note)}`
        : `${p.situation}: no pose (non-finite)`;
      return item;
    }));
    setStatus(`${result.poses.length} pose(s) in ${result.server.locate_s.toFixed(3)} s · video ${result.server.session}`);
    drawMap(url);
  } catch (error) {
    setStatus(error.message, true);
  } finally {
    $("locate").disabled = false;
  }
}

// "P(≤0.5 m) 0.41 · P(≤1.0 m) 0.83", or why there is no confidence (no calibration for the bundle).
function confidenceText(position, note) {
  if (!position.confidence) return `confidence: none (${note})`;
  const parts = Object.entries(position.confidence).map(([key, p]) => `P(≤${key.slice(7, -1)} m) ${finite(p) ? p.toFixed(2) : "?"}`);
  return `confidence ${parts.join(" · ")}${note.startsWith("calibration of a RANDOM") ? " (random weights: mechanism only)" : ""}`;
}

const finite = (value) => typeof value === "number" && Number.isFinite(value);

function showResult(url, result) {
  const pose = result.not_localized ? result.not_localized.pose : result;  // a pose below loc3r.min_confidence
  const { x, y, sigma } = pose.position || {};
  const { theta_rad: theta, theta_deg: degrees } = pose.orientation || {};
  if (result.bev_points) state.layout[url] = result.bev_points;
  if ([x, y, sigma, theta, degrees].every(finite)) {
    (state.history[url] = state.history[url] || []).push({ x, y, sigma, theta });
    $("pose-text").textContent =
      `${result.not_localized ? "NOT LOCALIZED · " : ""}x ${x.toFixed(2)} m   y ${y.toFixed(2)} m   σ ${sigma.toFixed(2)} m   ` +
      `heading ${degrees.toFixed(0)}°   ${confidenceText(pose.position, result.confidence_note)}`;
  } else {  // the server sends a non-finite pose as null: say so, draw nothing new
    $("pose-text").textContent = "no pose: the model gave a non-finite position (null)";
  }
  $("pose-text").title = result.confidence_note;
  const rows = { ...result.timings, queue_wait_s: result.server.queue_wait_s, server_ttft_s: result.server.ttft_s };
  $("timings").tBodies[0].replaceChildren(...Object.entries(rows).map(([name, value]) => {
    const row = document.createElement("tr");
    for (const text of [name, withUnit(name, value)]) {
      row.appendChild(document.createElement("td")).textContent = text;
    }
    return row;
  }));
  setStatus(`${$("status").textContent} · video ${result.server.session} · ${result.video.frames} frames`);
  drawMap(url);
}

// Every timing is in seconds but the decode rate (tokens per second).
function withUnit(name, value) {
  if (!finite(value)) return String(value);
  return name.endsWith("_per_s") ? `${value.toFixed(1)} tok/s` : `${value.toFixed(3)} s`;
}

function node(tag, attributes, parent) {
  const element = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, value);
  parent.appendChild(element);
  return element;
}

// World (x right, y up, metres) to SVG (y down): y is negated everywhere.
function drawMap(url) {
  const layout = state.layout[url] || [];
  const trail = state.history[url] || [];
  const last = trail[trail.length - 1];
  const located = (state.located[url] || []).map((p) => ({ x: p.position.x, y: p.position.y, sigma: p.position.sigma, theta: p.orientation.theta_rad }));
  const xs = layout.map((p) => p[0]).concat([...trail, ...located].flatMap((p) => [p.x - p.sigma, p.x + p.sigma]));
  const ys = layout.map((p) => p[1]).concat([...trail, ...located].flatMap((p) => [p.y - p.sigma, p.y + p.sigma]));
  if (!xs.length) { xs.push(-2, 2); ys.push(-2, 2); }
  const span = Math.max(Math.max(...xs) - Math.min(...xs), Math.max(...ys) - Math.min(...ys), 1);
  const pad = 0.12 * span;
  const left = Math.min(...xs) - pad, top = -Math.max(...ys) - pad, size = span + 2 * pad;
  $("map").setAttribute("viewBox", `${left} ${top} ${size} ${size}`);

  const grid = $("grid"), layer = $("layout"), path = $("trail"), pose = $("pose"), labels = $("labels"), many = $("located");
  for (const group of [grid, layer, path, pose, labels, many]) group.replaceChildren();
  const raw = size / 6, magnitude = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = magnitude * (raw / magnitude >= 5 ? 5 : raw / magnitude >= 2 ? 2 : 1);  // 1, 2 or 5 x 10^k: about 6 lines
  const font = size / 32, digits = step < 1 ? 1 : 0, metres = (v) => `${(Math.abs(v) < step / 2 ? 0 : v).toFixed(digits)}`;
  for (let v = Math.ceil(left / step) * step; v <= left + size; v += step) {
    node("line", { x1: v, y1: top, x2: v, y2: top + size, "vector-effect": "non-scaling-stroke", class: Math.abs(v) < step / 2 ? "axis" : "" }, grid);
    node("text", { x: v, y: top + size - font * 0.4, "font-size": font, "text-anchor": "middle", class: "tick x" }, labels).textContent = metres(v);
  }
  for (let v = Math.ceil(top / step) * step; v <= top + size; v += step) {
    node("line", { x1: left, y1: v, x2: left + size, y2: v, "vector-effect": "non-scaling-stroke", class: Math.abs(v) < step / 2 ? "axis" : "" }, grid);
    node("text", { x: left + font * 0.3, y: v - font * 0.25, "font-size": font, class: "tick y" }, labels).textContent = metres(-v);
  }
  node("text", { x: left + size - font * 0.3, y: top + size - font * 1.5, "font-size": font * 1.1, "text-anchor": "end", class: "axis-title" }, labels)
    .textContent = "x (m) →";
  node("text", { x: left + font * 3, y: top + font * 1.2, "font-size": font * 1.1, class: "axis-title" }, labels).textContent = "↑ y (m)";
  const barY = top + font * 1.6, barX = left + size - step - font * 0.5;  // scale bar (one grid step), top right
  node("line", { x1: barX, y1: barY, x2: barX + step, y2: barY, "stroke-width": font / 5, class: "scale-bar" }, labels);
  node("text", { x: barX + step / 2, y: barY - font * 0.3, "font-size": font, "text-anchor": "middle", class: "scale-label" }, labels)
    .textContent = `${step.toFixed(digits)} m`;
  const dot = size / 250;
  for (const [px, py] of layout) node("circle", { cx: px, cy: -py, r: dot }, layer);
  if (trail.length > 1) {
    node("polyline", { points: trail.map((p) => `${p.x},${-p.y}`).join(" "), "stroke-width": size / 400 }, path);
    for (const p of trail.slice(0, -1)) node("circle", { cx: p.x, cy: -p.y, r: size / 120, class: "past" }, path);
  }
  located.forEach((p, index) => {
    node("circle", { class: "located-sigma", cx: p.x, cy: -p.y, r: Math.max(p.sigma, 0), "stroke-width": size / 500 }, many);
    node("polygon", { class: "located-arrow", points: arrow(p.x, p.y, p.theta, Math.max(0.08 * size, p.sigma / 2)) }, many);
    node("text", { x: p.x, y: -p.y, "font-size": size / 30, class: "located-label" }, many).textContent = String(index + 1);
  });
  if (!last) return;
  node("circle", { id: "sigma-circle", cx: last.x, cy: -last.y, r: Math.max(last.sigma, 0), "stroke-width": size / 500 }, pose);
  node("circle", { id: "position", cx: last.x, cy: -last.y, r: size / 80 }, pose);
  node("polygon", { id: "pose-arrow", points: arrow(last.x, last.y, last.theta, Math.max(0.15 * size, last.sigma)) }, pose);
}

function arrow(x, y, theta, length) {
  const [dx, dy, nx, ny] = [Math.cos(theta), Math.sin(theta), -Math.sin(theta), Math.cos(theta)];
  const shaft = length * 0.05, head = length * 0.35, wing = length * 0.18, neck = length - head;
  const at = (along, across) => `${x + dx * along + nx * across},${-(y + dy * along + ny * across)}`;
  return [at(0, shaft), at(neck, shaft), at(neck, wing), at(length, 0), at(neck, -wing), at(neck, -shaft), at(0, -shaft)].join(" ");
}

$("videos").addEventListener("change", showVideo);
$("upload").addEventListener("change", (event) => event.target.files[0] && upload(event.target.files[0]));
$("ask-form").addEventListener("submit", ask);
$("locate-form").addEventListener("submit", locate);
$("api-key").addEventListener("change", () => { sessionStorage.setItem("loc3r-key", $("api-key").value); loadVideos(); });
loadModel().then(() => loadVideos()).then(() => drawMap($("videos").value)).catch((error) => setStatus(error.message, true));
