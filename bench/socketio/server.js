// The peer the bench measures us against: a socket.io 4 server on the Redis adapter, as a
// user would write it. A client joins the room named in its handshake query; a "gesture"
// from one client is relayed to the others in its room, on whichever process they are
// (through Redis), and acknowledged to the sender.
//   PORT=... REDIS_URL=redis://127.0.0.1:PORT KEY=prefix node server.js
const { createServer } = require("node:http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

async function main() {
  const pub = createClient({ url: process.env.REDIS_URL });
  const sub = pub.duplicate();
  await Promise.all([pub.connect(), sub.connect()]);
  const http = createServer((req, res) => {
    res.writeHead(req.url === "/readyz" ? 200 : 404).end();
  });
  const io = new Server(http, {
    adapter: createAdapter(pub, sub, { key: process.env.KEY || "socket.io" }),
    transports: ["websocket"], // as our clients: a WebSocket straight away, no long-polling
    perMessageDeflate: false, // as our service: compression off
    serveClient: false,
  });
  io.on("connection", (socket) => {
    const room = String(socket.handshake.query.room || "");
    socket.join(room);
    socket.on("gesture", (msg, ack) => {
      socket.to(room).emit("gesture_received", msg);
      if (typeof ack === "function") ack("ok");
    });
  });
  http.listen(Number(process.env.PORT), "127.0.0.1");
  process.on("SIGTERM", () => process.exit(0));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
