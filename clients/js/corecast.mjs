// corecast client: subscribe to topics over the `corecast.v1` envelope, keep
// each topic's epoch and sequence number, reconnect with jittered backoff and
// resubscribe with `since`, and tell the application about snapshots (last
// values), recoveries, gaps and restarts. ES module, no dependencies: runs in
// browsers and in Node (>= 22, or 20 with --experimental-websocket, or any
// WebSocket class passed as `options.WebSocket`, e.g. the `ws` package).
//
// The protocol is docs/PROTOCOL.md ("Envelopes", "Recovery", "Last value").

const PROTOCOL = "corecast.v1";
/** Most positions of topics followed through patterns one subscribe may carry (the server's cap). */
const PATTERN_REPLAY_TOPICS = 256;

/** Whether `name` is a pattern: a `*` token, or a last `>` token. */
export function isPattern(name) {
  return name.split(".").some((t) => t === "*" || t === ">");
}

/** Whether pattern `pattern` matches topic `topic` (docs/PROTOCOL.md, "Wildcards"). */
export function matches(pattern, topic) {
  const p = pattern.split(".");
  const t = topic.split(".");
  for (let i = 0; i < p.length; i++) {
    if (p[i] === ">") return i < t.length;
    if (i >= t.length) return false;
    if (p[i] !== "*" && p[i] !== t[i]) return false;
  }
  return p.length === t.length;
}

/** @typedef {{topic: string, epoch: number, seq: number, data: string | Uint8Array,
 *   snapshot: boolean, recovered: boolean, conflated: boolean}} Publication */

function decodeBase64(s) {
  if (typeof atob === "function") {
    const bin = atob(s);
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }
  return new Uint8Array(Buffer.from(s, "base64"));
}

export class CorecastClient {
  /**
   * @param {string} url  ws:// or wss:// URL of the server's `/ws` endpoint
   * @param {object} [options]
   * @param {typeof WebSocket} [options.WebSocket]  a WebSocket class (default: the global one)
   * @param {number} [options.minDelayMs=100]  first reconnection delay bound
   * @param {number} [options.maxDelayMs=10000]  largest reconnection delay bound
   * @param {(attempt: number) => number} [options.backoff]  reconnection delay in ms for
   *   the given attempt (0, 1, …); default: full jitter, random below
   *   min(maxDelayMs, minDelayMs * 2^attempt)
   * @param {(e: object) => void} [options.onEvent]  every event (see `on`)
   * @param {number} [options.maxRate]  at most this many publications per second of each
   *   topic (the newest; the others reported as `conflated`): the default of
   *   `subscribe`'s own `maxRate`
   */
  constructor(url, options = {}) {
    this.url = url;
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (!this.WebSocket) {
      throw new Error("no WebSocket class: pass options.WebSocket (e.g. the ws package)");
    }
    this.minDelayMs = options.minDelayMs ?? 100;
    this.maxRate = options.maxRate ?? 0;
    this.maxDelayMs = options.maxDelayMs ?? 10000;
    // Full jitter: a random delay below an exponentially growing bound, so a
    // crowd of clients does not come back in step.
    this.backoff =
      options.backoff ??
      ((attempt) => Math.floor(Math.random() * Math.min(this.maxDelayMs, this.minDelayMs * 2 ** attempt)));
    /** subscribed name (topic or pattern) -> handler */
    this.subs = new Map();
    /** subscribed name -> its maxRate (0: none) */
    this.rates = new Map();
    /** topic -> {epoch, seq}: the last publication seen of each topic */
    this.positions = new Map();
    this.listeners = new Map();
    if (options.onEvent) this.on("*", options.onEvent);
    this.attempt = 0;
    this.closed = false;
    this.ws = null;
    this.timer = null;
    this.snapshotNext = new Map();
    this.conflatedNext = new Map();
    this.recovering = new Map();
    this.connect();
  }

  /**
   * Listens to events: `open`, `close` ({code, reason, delayMs}), `snapshot`
   * (a publication that is the topic's last value), `recovered` ({topic, epoch,
   * from, to, complete, reason}), `gap` ({topic, epoch, from, to, reason}:
   * numbers that will not arrive), `conflated` ({topic, epoch, from, to, replaced}:
   * the `replaced` numbers among `from`..`to` that did not arrive were
   * replaced by the newer publications that came (the newest of each
   * conflation key; told with the last of them), on a slow connection, a
   * `maxRate` or an `always` namespace: not lost, superseded), `reset`
   * ({topic, epoch, previousEpoch}: the
   * topic's numbering started over), `error` ({reason}); `*` gets them all.
   */
  on(type, fn) {
    if (!this.listeners.has(type)) this.listeners.set(type, []);
    this.listeners.get(type).push(fn);
    return this;
  }

  emit(type, detail) {
    const e = { type, ...detail };
    for (const fn of this.listeners.get(type) ?? []) fn(e);
    for (const fn of this.listeners.get("*") ?? []) fn(e);
  }

  /**
   * Subscribes to `name`, a topic or a pattern (`prices.*.EUR`, `news.>`);
   * `handler(publication)` gets every publication of the topic (of each
   * topic the pattern matches) in order, each number once (a recovered one
   * is marked `recovered`, a last value `snapshot`). A publication matching
   * several subscriptions goes to the topic's own handler if there is one,
   * else to the first subscribed pattern matching it.
   *
   * `options.maxRate`: at most this many publications per second of each of
   * its topics (the newest; the others reported as `conflated`); default the
   * client's `maxRate`, 0 for none. Subscribing again to a name changes it.
   */
  subscribe(name, handler, options = {}) {
    const known = this.subs.has(name);
    const rate = options.maxRate ?? this.maxRate;
    const changed = known && this.rates.get(name) !== rate;
    this.subs.set(name, handler);
    this.rates.set(name, rate);
    if (!known || changed) this.sendSubscribe([name]);
  }

  unsubscribe(name) {
    if (!this.subs.delete(name)) return;
    this.rates.delete(name);
    for (const topic of [...this.positions.keys()]) {
      if (!this.handlerFor(topic)) this.positions.delete(topic);
    }
    this.send({ op: "unsubscribe", topics: [name] });
  }

  /** The last position seen on `topic`: {epoch, seq}, or null. */
  position(topic) {
    const t = this.positions.get(topic);
    return t ? { epoch: t.epoch, seq: t.seq } : null;
  }

  /** The handler a publication of `topic` goes to, if any. */
  handlerFor(topic) {
    const own = this.subs.get(topic);
    if (own) return own;
    for (const [name, handler] of this.subs) {
      if (isPattern(name) && matches(name, topic)) return handler;
    }
    return null;
  }

  /** Closes for good (no reconnection). */
  close() {
    this.closed = true;
    clearTimeout(this.timer);
    clearTimeout(this.retryTimer);
    if (this.ws) this.ws.close(1000, "client closing");
  }

  /** Drops the connection as a network failure would (for tests and drills). */
  dropConnection() {
    if (this.ws) this.ws.close(4000, "dropped by the application");
  }

  connect() {
    const ws = new this.WebSocket(this.url, [PROTOCOL]);
    this.ws = ws;
    ws.binaryType = "arraybuffer";
    ws.onopen = () => {
      if (ws.protocol && ws.protocol !== PROTOCOL) {
        this.emit("error", { reason: `server chose subprotocol ${ws.protocol}` });
        ws.close(1002, "unexpected subprotocol");
        return;
      }
      this.attempt = 0;
      this.snapshotNext.clear();
      this.conflatedNext.clear();
      this.recovering.clear();
      this.emit("open", {});
      this.sendSubscribe([...this.subs.keys()]);
    };
    ws.onmessage = (ev) => this.onMessage(ev.data);
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (this.closed) {
        this.emit("close", { code: ev.code, reason: ev.reason, delayMs: null });
        return;
      }
      const delayMs = this.backoff(this.attempt);
      this.attempt = Math.min(this.attempt + 1, 30);
      this.emit("close", { code: ev.code, reason: ev.reason, delayMs });
      this.timer = setTimeout(() => this.connect(), delayMs);
    };
    ws.onerror = () => {};
  }

  send(obj) {
    if (this.ws && this.ws.readyState === 1) this.ws.send(JSON.stringify(obj));
  }

  sendSubscribe(names) {
    if (names.length === 0) return;
    // One message per rate (a subscribe's max_rate is its names').
    const byRate = new Map();
    for (const n of names) {
      const r = this.rates.get(n) ?? this.maxRate;
      if (!byRate.has(r)) byRate.set(r, []);
      byRate.get(r).push(n);
    }
    if (byRate.size > 1) {
      for (const group of byRate.values()) this.sendSubscribe(group);
      return;
    }
    const since = {};
    const patterns = names.filter(isPattern);
    let throughPatterns = 0;
    for (const [topic, t] of this.positions) {
      if (names.includes(topic)) {
        since[topic] = { epoch: t.epoch, seq: t.seq };
      } else if (
        !this.subs.has(topic) &&
        throughPatterns < PATTERN_REPLAY_TOPICS &&
        patterns.some((p) => matches(p, topic))
      ) {
        // A topic followed through a pattern: its position rides along
        // (at most PATTERN_REPLAY_TOPICS in all; the rest start live).
        throughPatterns++;
        since[topic] = { epoch: t.epoch, seq: t.seq };
      }
    }
    const msg = { op: "subscribe", topics: names };
    const rate = this.rates.get(names[0]) ?? this.maxRate;
    if (rate > 0) msg.max_rate = rate;
    if (Object.keys(since).length > 0) msg.since = since;
    this.send(msg);
  }

  onMessage(data) {
    if (typeof data !== "string") {
      this.emit("error", { reason: "binary frame on corecast.v1" });
      return;
    }
    let m;
    try {
      m = JSON.parse(data);
    } catch {
      this.emit("error", { reason: "malformed JSON from the server" });
      return;
    }
    switch (m.op) {
      case "pub":
        return this.onPublication(m);
      case "snapshot":
        this.snapshotNext.set(m.topic, m.seq);
        return;
      case "conflated":
        // The publications numbered `from` to `seq` that follow (one per
        // conflation key, in order) stand for the rest, replaced.
        this.conflatedNext.set(m.topic, {
          seq: m.seq,
          replaced: m.replaced,
          from: m.from !== undefined ? m.from : m.seq - m.replaced,
        });
        return;
      case "subscribed":
        for (const [topic, r] of Object.entries(m.recovery ?? {})) this.onRecovery(topic, r);
        return;
      case "unsubscribed":
        return;
      case "error":
        if (m.retry_ms !== undefined) {
          // Recovery busy (a reconnect storm): nothing was applied; ask
          // again for everything not held yet, a little later.
          const delay = m.retry_ms + Math.floor(Math.random() * m.retry_ms);
          clearTimeout(this.retryTimer);
          this.retryTimer = setTimeout(() => this.sendSubscribe([...this.subs.keys()]), delay);
          this.emit("busy", { retryMs: delay });
          return;
        }
        this.emit("error", { reason: m.reason });
        return;
      default:
        this.emit("error", { reason: `unknown op ${m.op}` });
    }
  }

  onRecovery(topic, r) {
    const t = this.positions.get(topic);
    if (!t) return;
    this.emit("recovered", { topic, ...r });
    if (r.epoch !== t.epoch) {
      this.emit("reset", { topic, epoch: r.epoch, previousEpoch: t.epoch });
    } else if (!r.complete && r.from > t.seq + 1) {
      this.emit("gap", { topic, epoch: r.epoch, from: t.seq + 1, to: r.from - 1, reason: r.reason });
    }
    if (r.epoch !== t.epoch) {
      // Start over: numbers of the new epoch follow from `from`.
      t.epoch = r.epoch;
      t.seq = r.from - 1;
    }
    if (r.from <= r.to) this.recovering.set(topic, r.to);
  }

  onPublication(m) {
    const handler = this.handlerFor(m.topic);
    if (!handler) return; // unsubscribed meanwhile
    let t = this.positions.get(m.topic);
    if (!t) {
      t = { epoch: null, seq: null };
      this.positions.set(m.topic, t);
    }
    const snapshot = this.snapshotNext.get(m.topic) === m.seq;
    if (snapshot) this.snapshotNext.delete(m.topic);
    const c = this.conflatedNext.get(m.topic);
    const conflated = c !== undefined && m.seq >= c.from && m.seq <= c.seq;
    if (c !== undefined && m.seq >= c.seq) this.conflatedNext.delete(m.topic);
    const upto = this.recovering.get(m.topic);
    const recovered = upto !== undefined && m.seq <= upto;
    if (upto !== undefined && m.seq >= upto) this.recovering.delete(m.topic);
    if (t.epoch !== null && m.epoch !== t.epoch) {
      this.emit("reset", { topic: m.topic, epoch: m.epoch, previousEpoch: t.epoch });
    } else if (t.epoch !== null && !snapshot && m.seq !== t.seq + 1) {
      if (m.seq <= t.seq) return; // already delivered (cannot happen with this server)
      // Numbers the marker accounts for were replaced, not lost; any
      // before them are a gap.
      const from = conflated ? c.from : m.seq;
      if (from > t.seq + 1) {
        this.emit("gap", { topic: m.topic, epoch: m.epoch, from: t.seq + 1, to: from - 1, reason: "skipped" });
      }
    }
    if (conflated && m.seq === c.seq) {
      this.emit("conflated", {
        topic: m.topic,
        epoch: m.epoch,
        from: c.from,
        to: m.seq - 1,
        replaced: c.replaced,
      });
    }
    t.epoch = m.epoch;
    t.seq = m.seq;
    const data = m.text !== undefined ? m.text : decodeBase64(m.base64);
    handler({ topic: m.topic, epoch: m.epoch, seq: m.seq, data, snapshot, recovered, conflated });
  }
}
