// socket.io-client load generator, the node twin of `python -m bench.gen` in `ws` mode and
// driven by the bench the same way: `node load.js CONFIG.json`, one JSON object a line.
//   bench -> here: {"cmd": "go", rate, duration, tag} | {"cmd": "report", tag, full} | {"cmd": "stop"}
//   here -> bench: {"event": "ready" | "done" | "report" | "stopped" | "error", ...}
// CONFIG: {deadline, gen, clients: [[port, room], ...]}. Senders stamp each message
// `b|TAG|GEN.SEQ|EPOCH`; receivers record latency as wall-clock time at receipt minus EPOCH.
const fs = require("node:fs");
const readline = require("node:readline");
const { io } = require("socket.io-client");

const cfg = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
setTimeout(() => process.exit(2), (cfg.deadline || 600) * 1000).unref(); // the hard limit
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const now = () => (performance.timeOrigin + performance.now()) / 1000;

const keys = new Map(); // tag -> Set of GEN.SEQ
const lats = new Map(); // tag -> [ms]
let acks = 0;
let errors = 0;

function note(msg) {
  if (typeof msg !== "string" || !msg.startsWith("b|")) return;
  const t = now();
  const [, tag, key, sent] = msg.split("|");
  if (!keys.has(tag)) {
    keys.set(tag, new Set());
    lats.set(tag, []);
  }
  const seen = keys.get(tag);
  if (seen.has(key)) return;
  seen.add(key);
  lats.get(tag).push(Math.round((t - Number(sent)) * 1e6) / 1e3);
}

const clients = cfg.clients.map(([port, room]) => {
  const s = io(`http://127.0.0.1:${port}`, {
    transports: ["websocket"],
    query: { room },
    forceNew: true,
    reconnection: false,
    timeout: 10000,
  });
  s.on("gesture_received", note);
  s.on("connect_error", () => errors++);
  return s;
});

function sendAt(rate, duration, tag) {
  return new Promise((resolve) => {
    const live = clients.filter((s) => s.connected);
    if (!live.length || rate <= 0) return resolve({ sent: 0, elapsed: 0 });
    const start = now();
    const end = start + duration;
    let sent = 0;
    const ack = () => acks++;
    const tick = () => {
      const t = now();
      if (t >= end) return resolve({ sent, elapsed: now() - start });
      const due = Math.min(Math.floor((t - start) * rate) - sent, 10000);
      for (let k = 0; k < due; k++) {
        const s = live[sent % live.length];
        s.emit("gesture", `b|${tag}|${cfg.gen}.${sent}|${now().toFixed(6)}`, ack);
        sent++;
      }
      setTimeout(tick, 2);
    };
    tick();
  });
}

async function main() {
  const tStart = now();
  const limit = Date.now() + (cfg.connect_deadline || 60) * 1000;
  while (Date.now() < limit && clients.some((s) => !s.connected)) {
    await new Promise((r) => setTimeout(r, 20));
  }
  const connected = clients.filter((s) => s.connected).length;
  emit({ event: "ready", connected, total: clients.length, t_start: tStart, t_done: now() });
  const rl = readline.createInterface({ input: process.stdin });
  for await (const line of rl) {
    if (!line.trim()) continue;
    const cmd = JSON.parse(line);
    if (cmd.cmd === "go") {
      emit({ event: "done", ...(await sendAt(cmd.rate, cmd.duration, cmd.tag)) });
    } else if (cmd.cmd === "report") {
      const out = { event: "report", n: keys.has(cmd.tag) ? keys.get(cmd.tag).size : 0 };
      if (cmd.full !== false) out.lat = lats.get(cmd.tag) || [];
      out.acks = acks;
      out.errors = errors;
      out.up = clients.filter((s) => s.connected).length;
      emit(out);
    } else if (cmd.cmd === "stop") {
      break;
    }
  }
  for (const s of clients) s.close();
  emit({ event: "stopped" });
  process.exit(0);
}

main().catch((err) => {
  emit({ event: "error", error: String(err && err.stack ? err.stack : err) });
  process.exit(1);
});
