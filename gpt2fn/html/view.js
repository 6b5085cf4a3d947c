// gpt2fn views: boots every interactive part on the page once. Strings from the data go into the page only through
// textContent (never innerHTML), so a token's text stays text.
(function () {
  "use strict";
  if (!window.G2F) {
    const G2F = {};
    window.G2F = G2F;

    async function inflate(b64) {
      const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
      return new Uint8Array(await new Response(stream).arrayBuffer());
    }

    function blue(t) { // white -> rgb(37,99,235), t in [0, 1]
      return [255 + (37 - 255) * t, 255 + (99 - 255) * t, 255 + (235 - 255) * t];
    }

    G2F.attention = async function (root) {
      root.dataset.booted = "1";
      const data = JSON.parse(root.querySelector("script.g2f-data").textContent);
      const raw = await inflate(data.bin);
      const L = data.layers.length, H = data.heads.length, Q = data.nq, N = data.nk, K = data.k;
      const cells = L * H * Q * K;
      const idx = new Uint16Array(cells), w = raw.subarray(2 * cells, 3 * cells), mass = raw.subarray(3 * cells);
      for (let i = 0; i < cells; i++) idx[i] = raw[2 * i] | (raw[2 * i + 1] << 8);
      const state = {layer: 0, head: 0, token: null, locked: false, mode: "dst"};
      const base = (l, h, q) => ((l * H + h) * Q + q) * K;

      const layerSel = root.querySelector(".g2f-layer"), modeSel = root.querySelector(".g2f-mode");
      data.layers.forEach((name, i) => {
        const o = document.createElement("option"); o.value = String(i); o.textContent = name; layerSel.appendChild(o);
      });
      const toks = Array.from(root.querySelectorAll(".g2f-attn-toks .g2f-tok"));
      const canvas = root.querySelector(".g2f-canvas"), info = root.querySelector(".g2f-info");
      const list = root.querySelector(".g2f-list"), headsBox = root.querySelector(".g2f-heads");
      canvas.width = N; canvas.height = Q;

      function draw(cv, l, h, size) { // the pattern of head (l, h), binned to size x size pixels at most
        const rows = Math.min(Q, size), cols = Math.min(N, size);
        cv.width = cols; cv.height = rows;
        const ctx = cv.getContext("2d"), img = ctx.createImageData(cols, rows), px = img.data;
        const acc = new Float32Array(rows * cols);
        for (let q = 0; q < Q; q++) {
          const b = base(l, h, q), r = Math.floor(q * rows / Q);
          for (let j = 0; j < K; j++) {
            const v = w[b + j]; if (!v) continue;
            const c = Math.floor(idx[b + j] * cols / N), a = r * cols + c;
            if (v > acc[a]) acc[a] = v;
          }
        }
        for (let a = 0; a < rows * cols; a++) {
          const r = Math.floor(a / cols), c = a % cols;
          const masked = c * N / cols > Math.ceil((r + 1) * Q / rows) - 1 + (N - Q); // above the causal diagonal
          const [R, G, B] = masked ? [243, 244, 246] : blue(acc[a] / 255);
          px[4 * a] = R; px[4 * a + 1] = G; px[4 * a + 2] = B; px[4 * a + 3] = 255;
        }
        ctx.putImageData(img, 0, 0);
        return ctx;
      }

      function weightsFor(i) { // attention of the chosen head between token i and every token, in the chosen mode
        const out = new Float32Array(Math.max(N, Q));
        if (state.mode === "dst") {
          const b = base(state.layer, state.head, i);
          for (let j = 0; j < K; j++) if (w[b + j]) out[idx[b + j]] = w[b + j] / 255;
        } else {
          for (let q = 0; q < Q; q++) {
            const b = base(state.layer, state.head, q);
            for (let j = 0; j < K; j++) if (w[b + j] && idx[b + j] === i) out[q] = w[b + j] / 255;
          }
        }
        return out;
      }

      function paintTokens() {
        const i = state.token;
        list.textContent = "";
        toks.forEach((el) => { el.style.background = ""; el.style.color = ""; el.classList.remove("g2f-focus"); });
        const head = `${data.layers[state.layer]}, ${data.heads[state.head]}`;
        if (i === null) { info.textContent = `${head}: hover a token`; root.dataset.focus = ""; return; }
        const ws = weightsFor(i);
        toks.forEach((el, j) => {
          const t = ws[j] || 0, [R, G, B] = blue(t);
          el.style.background = `rgb(${R | 0},${G | 0},${B | 0})`; el.style.color = t > 0.6 ? "#fff" : "#111";
        });
        toks[i].classList.add("g2f-focus");
        const ranked = Array.from(ws.keys()).filter((j) => ws[j] > 0).sort((a, b) => ws[b] - ws[a]).slice(0, 10);
        const names = state.mode === "dst" ? data.keys : data.tokens;
        const kept = state.mode === "dst" ? ` (stored entries hold ${(mass[(state.layer * H + state.head) * Q + i] / 2.55).toFixed(0)}% of its attention)` : "";
        info.textContent = `${head}\ntoken ${i} ${JSON.stringify(data.tokens[i])}: ` +
          (state.mode === "dst" ? "attends to" : "is attended by") + kept + (state.locked ? " [locked]" : "");
        for (const j of ranked) {
          const li = document.createElement("li");
          li.textContent = `${ws[j].toFixed(3)}  ${j}: ${JSON.stringify(names[j])}`;
          list.appendChild(li);
        }
        root.dataset.focus = String(i);
      }

      function paintMain() {
        const ctx = draw(canvas, state.layer, state.head, 1024);
        if (state.token !== null && state.mode === "dst" && canvas.height) {
          const y = Math.floor(state.token * canvas.height / Q);
          ctx.fillStyle = "rgba(245,158,11,0.35)"; ctx.fillRect(0, y, canvas.width, Math.max(1, canvas.height / Q));
        }
        root.dataset.layer = String(state.layer); root.dataset.head = String(state.head);
      }

      function paintHeads() {
        headsBox.textContent = "";
        data.heads.forEach((name, h) => {
          const fig = document.createElement("div"); fig.className = "g2f-head" + (h === state.head ? " g2f-sel" : "");
          const cv = document.createElement("canvas"); draw(cv, state.layer, h, 96);
          const cap = document.createElement("span"); cap.textContent = name;
          fig.appendChild(cv); fig.appendChild(cap);
          fig.addEventListener("mouseenter", () => { if (!state.headLocked) { state.head = h; update(false); } });
          fig.addEventListener("click", () => { state.head = h; state.headLocked = true; update(true); });
          headsBox.appendChild(fig);
        });
      }

      function update(heads) {
        if (heads) paintHeads();
        else headsBox.querySelectorAll(".g2f-head").forEach((el, h) => el.classList.toggle("g2f-sel", h === state.head));
        paintMain(); paintTokens();
      }

      toks.forEach((el, i) => {
        el.addEventListener("mouseenter", () => { if (!state.locked) { state.token = i; paintMain(); paintTokens(); } });
        el.addEventListener("click", () => {
          state.locked = !(state.locked && state.token === i); state.token = i; paintMain(); paintTokens();
        });
      });
      canvas.addEventListener("mousemove", (ev) => {
        if (state.locked) return;
        const r = canvas.getBoundingClientRect();
        const q = Math.min(Q - 1, Math.max(0, Math.floor((ev.clientY - r.top) / r.height * Q)));
        if (q !== state.token || state.mode !== "dst") { state.mode = "dst"; modeSel.value = "dst"; state.token = q; paintMain(); paintTokens(); }
      });
      layerSel.addEventListener("change", () => { state.layer = Number(layerSel.value); update(true); });
      modeSel.addEventListener("change", () => { state.mode = modeSel.value; paintMain(); paintTokens(); });
      headsBox.addEventListener("mouseleave", () => { if (!state.headLocked) update(false); });
      update(true);
      root.dataset.ready = "1";
    };

    G2F.boot = function () {
      for (const el of document.querySelectorAll(".g2f-attn:not([data-booted])")) {
        G2F.attention(el).catch((err) => { el.dataset.error = String(err); console.error("gpt2fn view:", err); });
      }
    };
  }
  window.G2F.boot();
})();
