// A small client of the gesture service's WebSocket protocol (docs/protocol.md).
// No dependencies, no build step: copy this file into your app.
//
//   const client = new GestureClient({
//     url: "wss://gestures.example.com/ws", relationshipId, token,
//     onFrame: (frame) => { ... },          // every frame, gesture_received deduplicated
//     onStatus: (status) => { ... },        // {state: "connecting" | "connected" |
//   });                                     //   "reconnecting" | "closed", ...}
//   client.start();
//   client.sendGesture("hug", "thinking of you");   // returns the frame's request_id
//
// What it does for you:
// - reconnects after any drop with exponential backoff and jitter (0.5 s doubling to 30 s,
//   each wait a random 50-100 % of that), so a restarted server is not hit by every client
//   at once; it gives up only on 4401 (token refused or expired) and 4403 (not a partner),
//   which a retry cannot fix;
// - sends `ping` every 30 s, well inside the server's idle timeout (75 s by default);
// - puts a `request_id` on every frame; replies to a frame (gesture_sent, error, pong,
//   gesture_acknowledged_confirm) carry it back, so you can tell which send an error is about;
// - drops a gesture_received it has already passed on: on every (re)connect the server
//   sends again every gesture still pending for you, and an event may arrive twice.

const FATAL = { 4401: "token refused or expired", 4403: "not a partner of this relationship" };

export class GestureClient {
  constructor({
    url,
    relationshipId,
    token,
    onFrame = () => {},
    onStatus = () => {},
    pingEvery = 30_000,
    minBackoff = 500,
    maxBackoff = 30_000,
  }) {
    Object.assign(this, { url, relationshipId, token, onFrame, onStatus });
    Object.assign(this, { pingEvery, minBackoff, maxBackoff });
    this.ws = null;
    this.attempt = 0; // failed connects since the last good one
    this.stopped = true;
    this.seen = new Set(); // gesture ids already passed on as gesture_received
    this.counter = 0;
    this.idPrefix = Math.random().toString(36).slice(2, 8);
  }

  start() {
    this.stopped = false;
    this.connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    clearInterval(this.pingTimer);
    if (this.ws) this.ws.close(1000, "bye");
    this.onStatus({ state: "closed", reason: "stopped" });
  }

  get connected() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  // Send a frame; returns its request_id, or null when not connected (nothing is queued:
  // a gesture should not go out minutes later without the user knowing).
  send(frame) {
    if (!this.connected) return null;
    const request_id = `${this.idPrefix}-${++this.counter}`;
    this.ws.send(JSON.stringify({ ...frame, request_id }));
    return request_id;
  }

  sendGesture(gestureType, message, extra = {}) {
    const frame = { type: "gesture", gesture_type: gestureType, ...extra };
    if (message) frame.message = message;
    return this.send(frame);
  }

  acknowledge(gestureId, sendBackType = null, sendBackMessage = null) {
    // No sendBackType: acknowledge only (send_back false), nothing goes back.
    const frame = { type: "gesture_acknowledge", gesture_id: gestureId, send_back: false };
    if (sendBackType) Object.assign(frame, { send_back: true, send_back_type: sendBackType });
    if (sendBackMessage) frame.send_back_message = sendBackMessage;
    return this.send(frame);
  }

  connect() {
    const query = new URLSearchParams({ relationship_id: this.relationshipId, token: this.token });
    this.onStatus({ state: "connecting", attempt: this.attempt });
    const ws = new WebSocket(`${this.url}?${query}`);
    this.ws = ws;
    let greeted = false;
    ws.onopen = () => {
      this.pingTimer = setInterval(() => this.send({ type: "ping" }), this.pingEvery);
    };
    ws.onmessage = (event) => {
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      if (!greeted) {
        // The server's first frame (the other partner's presence) means it accepted us:
        // only now does the backoff start afresh.
        greeted = true;
        this.attempt = 0;
        this.onStatus({ state: "connected" });
      }
      if (frame.type === "gesture_received") {
        if (this.seen.has(frame.gesture.id)) return;
        this.seen.add(frame.gesture.id);
        if (this.seen.size > 1000) this.seen.delete(this.seen.values().next().value);
      }
      this.onFrame(frame);
    };
    ws.onclose = (event) => {
      clearInterval(this.pingTimer);
      if (this.ws !== ws || this.stopped) return;
      this.ws = null;
      if (event.code in FATAL) {
        this.stopped = true;
        this.onStatus({ state: "closed", code: event.code, reason: FATAL[event.code] });
        return;
      }
      const ceiling = Math.min(this.maxBackoff, this.minBackoff * 2 ** this.attempt);
      const delay = Math.round(ceiling * (0.5 + Math.random() / 2));
      this.attempt += 1;
      this.onStatus({
        state: "reconnecting",
        code: event.code,
        reason: event.reason,
        delay,
        attempt: this.attempt,
      });
      this.retryTimer = setTimeout(() => this.connect(), delay);
    };
  }
}
