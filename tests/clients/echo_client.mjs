// Round-trips text and binary through a corecast /echo endpoint with Node's
// `ws` library (an independent client): ws:// or wss:// (trusting the CA
// file given for wss).
//
//   node echo_client.mjs URL [CAFILE]
import { readFileSync } from "node:fs";
import http from "node:http";
import https from "node:https";
import WebSocket from "ws";

const [url, cafile] = process.argv.slice(2);
const options = url.startsWith("wss://") ? { ca: readFileSync(cafile) } : {};
const ws = new WebSocket(url, options);
const messages = [
  ["hello", false],
  ["é€𝄞 unicode", false],
  ["x".repeat(70000), false],
  ...[0, 1, 125, 126, 65535, 65536, 1000003].map((n) => [
    Buffer.from(Array.from({ length: n }, (_, i) => (i * 31) % 251)),
    true,
  ]),
];
let i = 0;
const timer = setTimeout(() => {
  console.error(`node ws: ${url}: timed out at message ${i}`);
  process.exit(1);
}, 20000);
ws.on("open", () => {
  // ws offers permessage-deflate by default; the server agrees.
  if (!ws.extensions.includes("permessage-deflate")) {
    console.error(`node ws: ${url}: no permessage-deflate (${ws.extensions})`);
    process.exit(1);
  }
  ws.send(messages[0][0], { binary: messages[0][1] });
});
ws.on("message", (data, isBinary) => {
  const [want, binary] = messages[i];
  const same = binary ? isBinary && Buffer.compare(data, want) === 0 : !isBinary && data.toString() === want;
  if (!same) {
    console.error(`node ws: ${url}: message ${i} echoed wrong`);
    process.exit(1);
  }
  i += 1;
  if (i === messages.length) {
    clearTimeout(timer);
    ws.close(1000);
    return;
  }
  ws.send(messages[i][0], { binary: messages[i][1] });
});
ws.on("close", (code) => {
  if (i !== messages.length) {
    console.error(`node ws: ${url}: closed early (${code}) at message ${i}`);
    process.exit(1);
  }
  console.log(`node ws: ${url}: text and binary round trips OK, ${ws.extensions} (close ${code})`);
  publications();
});

// Publications to a subscriber that agreed to permessage-deflate (each
// compressed once by the server for all such subscribers).
function publications() {
  const sub = new WebSocket(url.replace("/echo", "/ws?topics=node.deflate"), options);
  const bodies = [0, 1, 2].map((i) =>
    JSON.stringify(Array.from({ length: 40 }, (_, j) => ({ sym: `SYM${j}`, bid: 100 + i + j / 100 }))),
  );
  let got = 0;
  sub.on("open", () => {
    if (!sub.extensions.includes("permessage-deflate")) {
      console.error(`node ws: ${url}: subscriber without permessage-deflate`);
      process.exit(1);
    }
    setTimeout(() => publish(0), 200);
  });
  const publish = (i) => {
    if (i === bodies.length) return;
    const u = new URL(url.replace("/echo", "/publish/node.deflate").replace(/^ws/, "http"));
    const req = (u.protocol === "https:" ? https : http).request(
      u,
      { method: "POST", headers: { "Content-Type": "text/plain" }, ca: options.ca },
      (res) => {
        res.resume();
        if (res.statusCode !== 204) {
          console.error(`node ws: publish answered ${res.statusCode}`);
          process.exit(1);
        }
        publish(i + 1);
      },
    );
    req.end(bodies[i]);
  };
  const deadline = setTimeout(() => {
    console.error(`node ws: ${url}: publications timed out at ${got}`);
    process.exit(1);
  }, 10000);
  sub.on("message", (data, isBinary) => {
    if (isBinary || data.toString() !== bodies[got]) {
      console.error(`node ws: ${url}: publication ${got} arrived changed`);
      process.exit(1);
    }
    got += 1;
    if (got === bodies.length) {
      clearTimeout(deadline);
      console.log(`node ws: ${url}: ${got} publications of ${bodies[0].length} B received over ${sub.extensions}`);
      sub.close(1000);
    }
  });
  sub.on("error", (e) => {
    console.error(`node ws: ${url}: subscriber ${e.message}`);
    process.exit(1);
  });
}
ws.on("error", (e) => {
  console.error(`node ws: ${url}: ${e.message}`);
  process.exit(1);
});
