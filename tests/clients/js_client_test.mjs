// The JavaScript client (clients/js/corecast.mjs) in Node against the real
// server, which this script starts and restarts itself:
//  1. a subscriber dropped in the middle of a stream, while HTTP publishing
//     goes on, reconnects and ends with every number exactly once (the
//     missed ones marked `recovered`, the recovery complete);
//  2. a second subscriber gets the topic's last value marked `snapshot`;
//  3. a pattern subscriber (`jsp.*`) following two topics is dropped
//     mid-stream and recovers both through the pattern, every number of
//     each once;
//  4. a client with `maxRate` gets a burst conflated: fewer publications,
//     the skipped numbers reported as `conflated` (never as a gap), the
//     newest last; with conflation keys (`?key=`), each key's newest, in
//     order, the rest accounted for the same way;
//  5. the server restarts: the client reconnects by itself, is told the
//     numbering started over (`reset`), and receives the new epoch from 1.
// WebSocket class: Node's `ws` package (installed by run.sh), trusting the
// test CA for wss://.
//
//   node js_client_test.mjs CORECAST_BIN PORT IO SCHEME [CERT KEY]
import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import net from "node:net";
import http from "node:http";
import https from "node:https";
import WebSocket from "ws";
import { CorecastClient } from "./corecast.mjs";

const [bin, port, io, scheme, cert, key] = process.argv.slice(2);
const tls = scheme === "wss";
const ca = tls ? readFileSync(cert) : undefined;
const base = `${tls ? "https" : "http"}://127.0.0.1:${port}`;
const label = `js client, ${io}, ${scheme}`;

const fail = (why) => {
  console.error(`${label}: FAIL: ${why}`);
  server?.kill("SIGKILL");
  process.exit(1);
};
setTimeout(() => fail("timed out after 60 s"), 60000).unref();

let server = null;
async function startServer() {
  const args = ["serve", "--listen", `127.0.0.1:${port}`, "--io", io];
  if (tls) args.push("--tls-cert", cert, "--tls-key", key);
  server = spawn(bin, args, { stdio: "ignore" });
  for (let i = 0; i < 100; i++) {
    const up = await new Promise((resolve) => {
      const s = net.connect(Number(port), "127.0.0.1", () => {
        s.end();
        resolve(true);
      });
      s.on("error", () => resolve(false));
    });
    if (up) return;
    await sleep(50);
  }
  fail("the server did not listen");
}

async function stopServer() {
  const exited = new Promise((resolve) => server.once("exit", resolve));
  server.kill("SIGKILL");
  await exited;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function publish(topic, body) {
  return new Promise((resolve, reject) => {
    const req = (tls ? https : http).request(
      `${base}/publish/${topic}`,
      { method: "POST", headers: { "Content-Type": "text/plain", "Content-Length": Buffer.byteLength(body) }, ca },
      (res) => {
        res.resume();
        res.on("end", () => (res.statusCode === 204 ? resolve() : reject(new Error(`status ${res.statusCode}`))));
      },
    );
    req.on("error", reject);
    req.end(body);
  });
}

class TrustingWebSocket extends WebSocket {
  constructor(url, protocols) {
    super(url, protocols, ca ? { ca } : {});
  }
}

const wsUrl = `${scheme}://127.0.0.1:${port}/ws`;
const newClient = (events, backoff) =>
  new CorecastClient(wsUrl, {
    WebSocket: TrustingWebSocket,
    minDelayMs: 50,
    maxDelayMs: 300,
    backoff,
    onEvent: (e) => events.push(e),
  });

async function until(what, cond, ms = 10000) {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) fail(`waited 10 s for ${what}`);
    await sleep(10);
  }
}

await startServer();

// 1. Dropped mid-stream, recovered exactly.
const events = [];
const got = [];
// Reconnections wait 300 ms: publishing goes on meanwhile.
const client = newClient(events, () => 300);
client.subscribe("jst", (p) => got.push(p));
await until("the first connection", () => events.some((e) => e.type === "open"));
await sleep(50); // the subscription is in place (its reply is not awaited by the API)
for (let n = 1; n <= 60; n++) {
  await publish("jst", `m${n}`);
  if (n === 20) {
    await until("number 20", () => got.length >= 20);
    client.dropConnection();
    await until("the drop", () => events.some((e) => e.type === "close"));
  }
}
await until("all 60 numbers", () => got.length >= 60);
await sleep(100);
const seqs = got.map((p) => p.seq);
const want = Array.from({ length: 60 }, (_, i) => i + 1);
if (JSON.stringify(seqs) !== JSON.stringify(want)) fail(`numbers ${seqs}`);
if (got.some((p, i) => p.data !== `m${i + 1}`)) fail("a payload does not match its number");
const recoveries = events.filter((e) => e.type === "recovered");
if (recoveries.length !== 1 || !recoveries[0].complete) fail(`recoveries ${JSON.stringify(recoveries)}`);
if (!got.some((p) => p.recovered)) fail("nothing was marked recovered (publishing outran the reconnection?)");
if (events.some((e) => e.type === "gap" || e.type === "reset")) fail("a gap or reset reported");
const epoch = got[0].epoch;

// 2. A late subscriber gets the last value, marked.
const lateGot = [];
const late = newClient([]);
late.subscribe("jst", (p) => lateGot.push(p));
await until("the last value", () => lateGot.length >= 1);
if (!lateGot[0].snapshot || lateGot[0].seq !== 60 || lateGot[0].data !== "m60") {
  fail(`last value ${JSON.stringify(lateGot[0])}`);
}
late.close();

// 3. A pattern: two topics through `jsp.*`, dropped mid-stream, both
// recovered through the pattern.
const pEvents = [];
const pGot = [];
const pc = newClient(pEvents, () => 300);
pc.subscribe("jsp.*", (p) => pGot.push(p));
await until("the pattern's connection", () => pEvents.some((e) => e.type === "open"));
await sleep(50);
for (let n = 1; n <= 30; n++) {
  await publish("jsp.a", `a${n}`);
  await publish("jsp.b", `b${n}`);
  if (n === 10) {
    await until("20 through the pattern", () => pGot.length >= 20);
    pc.dropConnection();
    await until("the pattern's drop", () => pEvents.some((e) => e.type === "close"));
  }
}
await until("60 through the pattern", () => pGot.length >= 60);
await sleep(100);
for (const t of ["jsp.a", "jsp.b"]) {
  const mine = pGot.filter((p) => p.topic === t);
  if (mine.map((p) => p.seq).join() !== want.slice(0, 30).join()) fail(`${t} through the pattern: ${mine.map((p) => p.seq)}`);
  if (mine.some((p, i) => p.data !== `${t.slice(-1)}${i + 1}`)) fail(`${t}: a payload does not match its number`);
}
const pRec = pEvents.filter((e) => e.type === "recovered");
if (pRec.length !== 2 || pRec.some((r) => !r.complete)) fail(`pattern recoveries ${JSON.stringify(pRec)}`);
if (!pGot.some((p) => p.recovered)) fail("nothing recovered through the pattern");
pc.close();

// 4. maxRate: a burst of 40 at 5/s arrives conflated, told apart from loss.
const rEvents = [];
const rGot = [];
const rc = new CorecastClient(wsUrl, {
  WebSocket: TrustingWebSocket,
  maxRate: 5,
  onEvent: (e) => rEvents.push(e),
});
rc.subscribe("jsr", (p) => rGot.push(p));
await until("the rated connection", () => rEvents.some((e) => e.type === "open"));
await sleep(50);
for (let n = 1; n <= 40; n++) await publish("jsr", `r${n}`);
await until("the newest value", () => rGot.some((p) => p.seq === 40));
if (rGot.length >= 40) fail(`maxRate let everything through: ${rGot.length}`);
const replaced = rEvents.filter((e) => e.type === "conflated").reduce((a, e) => a + e.replaced, 0);
if (rGot.length + replaced !== 40) fail(`received ${rGot.length} + conflated ${replaced} != 40`);
if (rEvents.some((e) => e.type === "gap")) fail("conflation reported as a gap");
if (rGot[rGot.length - 1].data !== "r40") fail("the newest value is not last");
// 4b. With conflation keys (?key=): the newest of each key, in number
// order, the rest accounted for as conflated.
const kGot = [];
rc.subscribe("jsk", (p) => kGot.push(p));
await sleep(300);
for (let n = 1; n <= 40; n++) await publish(`jsk?key=k${n % 3}`, `k${n % 3}:${n}`);
await until("every key's newest value", () => ["k0:39", "k1:40", "k2:38"].every((d) => kGot.some((p) => p.data === d)));
const kReplaced = rEvents
  .filter((e) => e.type === "conflated" && e.topic === "jsk")
  .reduce((a, e) => a + e.replaced, 0);
if (kGot.length + kReplaced !== 40) fail(`keyed: received ${kGot.length} + conflated ${kReplaced} != 40`);
if (kGot.some((p, i) => i > 0 && p.seq <= kGot[i - 1].seq)) fail("keyed: out of order");
if (rEvents.some((e) => e.type === "gap")) fail("keyed conflation reported as a gap");
// 4c. The rate is per subscription: one without a limit gets everything.
const uGot = [];
rc.subscribe("jsu", (p) => uGot.push(p), { maxRate: 0 });
await sleep(300);
for (let n = 1; n <= 10; n++) await publish("jsu", `u${n}`);
await until("every unrated publication", () => uGot.length === 10);
if (uGot.some((p) => p.conflated)) fail("an unrated subscription was conflated");
rc.close();

// 5. The server restarts: a new epoch, numbers from 1, told as a reset.
await stopServer();
await startServer();
await until("the reset", () => events.some((e) => e.type === "reset"));
const before = got.length;
for (let n = 1; n <= 3; n++) await publish("jst", `r${n}`);
await until("three publications of the new epoch", () => got.length >= before + 3);
const after = got.slice(before);
if (after.map((p) => p.seq).join() !== "1,2,3") fail(`after the restart: ${after.map((p) => p.seq)}`);
if (after[0].epoch === epoch) fail("the epoch did not change");
client.close();
await stopServer();
console.log(
  `${label}: 60 numbers once each across a dropped connection (recovered ${got.filter((p) => p.recovered).length}), ` +
    `last value as a snapshot, two topics recovered through a pattern, a rated burst conflated (not a gap), also per conflation key, ` +
    `a restart seen as a reset and the new epoch from 1: PASS`,
);
process.exit(0);
