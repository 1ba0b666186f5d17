// The demo page: two partner panes, each a GestureClient (client.js) of its own.
// Its address carries the relationship and the two tokens in the fragment (#rel=…&a=…&b=…),
// which the browser never sends to a server. HTTP calls go to this page's own origin; each
// pane's WebSocket goes where the fragment says (a_ws, b_ws), by default this origin's /ws.

import { GestureClient } from "./client.js";

const LABEL = { hug: "🤗 Hug", kiss: "💋 Kiss", thinking_of_you: "💭 Thinking of you" };
const OTHER = { partner_a: "partner_b", partner_b: "partner_a" };
const CLOSE_TEXT = {
  1000: "closed by the server",
  1006: "connection lost",
  1008: "too slow reading frames",
  1009: "frame too big",
  1011: "server error",
  1012: "server restarting",
  1013: "service unavailable",
};
// Words for every name a suggestion's `context_used` may hold (the built-in composer and the
// provider's prompt in service/suggestions.py). The API keeps identifiers, for programs; the
// page says them in words, here and nowhere else. A name missing here (a newer server) is
// shown as it comes, underscores as spaces.
const CONTEXT_WORDS = {
  time_of_day: "the time of day",
  last_received: "the last gesture your partner sent you",
  last_sent: "when you last sent one",
  streak: "your streak of days in a row",
  recent_gestures: "how many gestures you two exchanged this week",
};
const AND = new Intl.ListFormat("en", { type: "conjunction" });

function contextInWords(names) {
  if (!names || names.length === 0) return "nothing in particular";
  return AND.format(names.map((name) => CONTEXT_WORDS[name] || name.replace(/_/g, " ")));
}

const ERROR_TEXT = {
  rate_limited: (m) => `Slow down: ${m}.`,
  invalid: (m) => `Not accepted: ${m}.`,
  forbidden: (m) => `Not allowed: ${m}.`,
  not_found: (m) => `Not found: ${m}.`,
  unavailable: () => "The service cannot reach its database right now; try again shortly.",
};

const params = new URLSearchParams(location.hash.slice(1));
const ownWs = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;

function start(params) {
  const rel = params.get("rel");
  const urls = { a: params.get("a_ws") || ownWs, b: params.get("b_ws") || ownWs };
  document.getElementById("route").textContent =
    urls.a === urls.b
      ? `Both sockets: ${urls.a}.`
      : `Partner A's socket: ${urls.a}; partner B's: ${urls.b}. A gesture crosses from one ` +
        "process to the other through PostgreSQL and Redis.";
  for (const [key, role] of [["a", "partner_a"], ["b", "partner_b"]]) {
    new Pane(key, role, params.get(key), urls[key], rel);
  }
}

function subOf(token) {
  try {
    const body = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(body)).sub || "";
  } catch {
    return "";
  }
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  node.append(...children);
  return node;
}

function clock(iso) {
  return iso ? new Date(iso).toLocaleTimeString() : "";
}

class Pane {
  constructor(key, role, token, wsUrl, relationshipId) {
    Object.assign(this, { key, role, token, relationshipId });
    const root = document.getElementById("pane").content.firstElementChild.cloneNode(true);
    root.id = `pane-${key}`;
    document.getElementById("panes").append(root);
    this.root = root;
    this.$ = (selector) => root.querySelector(selector);
    const letter = key.toUpperCase();
    const other = key === "a" ? "B" : "A";
    this.$(".who").append(`Partner ${letter} `, el("small", { textContent: subOf(token) }));
    this.otherName = `Partner ${other}`;
    // Shown by the stylesheet only while its list is empty.
    this.$(".empty-received").textContent =
      `Nothing has arrived yet. When ${this.otherName} sends a gesture, it shows up here: ` +
      "acknowledge it, or acknowledge it and send one back.";
    this.$(".empty-sent").textContent =
      "You have not sent anything yet. Pick a gesture above, add a note if you like " +
      "(or ask for a suggested one), and press Send.";
    this.sent = new Map(); // gesture id -> list item
    this.received = new Map(); // gesture id -> list item
    this.requests = new Map(); // request_id -> what it was for
    this.suggestion = null; // {id, text} while the note is the suggestion, unedited
    this.gestureType = "hug";
    this.setPresence(null);

    for (const button of root.querySelectorAll(".types button")) {
      button.addEventListener("click", () => this.choose(button.dataset.type));
    }
    this.$(".send").addEventListener("click", () => this.sendGesture());
    this.$(".suggest").addEventListener("click", () => this.suggest());
    this.$(".toggle").addEventListener("click", () => this.toggle());

    this.client = new GestureClient({
      url: wsUrl,
      relationshipId,
      token,
      onFrame: (frame) => this.onFrame(frame),
      onStatus: (status) => this.onStatus(status),
    });
    this.client.start();
  }

  // ------------------------------------------------------------------ user actions

  choose(type) {
    this.gestureType = type;
    for (const button of this.root.querySelectorAll(".types button")) {
      button.setAttribute("aria-pressed", String(button.dataset.type === type));
    }
  }

  sendGesture() {
    const note = this.$("textarea").value.trim();
    const extra = {};
    if (this.suggestion && this.suggestion.text === note) extra.suggestion_id = this.suggestion.id;
    const requestId = this.client.sendGesture(this.gestureType, note || null, extra);
    if (requestId === null) {
      this.say("Not connected, so nothing was sent. Wait for the reconnect and send again.");
      return;
    }
    this.requests.set(requestId, "send");
    this.say("");
  }

  // sendBackType null: acknowledge only, nothing sent back.
  acknowledge(gestureId, sendBackType) {
    const requestId = this.client.acknowledge(gestureId, sendBackType);
    if (requestId === null) {
      this.say("Not connected, so nothing was acknowledged. Wait for the reconnect.");
      return;
    }
    this.requests.set(requestId, { ack: gestureId });
    for (const button of this.received.get(gestureId).querySelectorAll("button")) {
      button.disabled = true;
    }
  }

  async suggest() {
    this.say("Asking for a note…", true);
    let response;
    try {
      response = await fetch("/api/gestures/generate-message", {
        method: "POST",
        headers: { Authorization: `Bearer ${this.token}`, "Content-Type": "application/json" },
        body: JSON.stringify({
          relationship_id: this.relationshipId,
          sender_id: this.role,
          gesture_type: this.gestureType,
        }),
      });
    } catch {
      this.say("Could not reach the server for a suggestion.");
      return;
    }
    const body = await response.json().catch(() => ({}));
    if (response.status === 404 || response.status === 405) {
      this.say("Suggested notes are not available on this server (it has no generate-message).");
    } else if (response.status === 429) {
      const wait = response.headers.get("Retry-After");
      this.say(`Too many suggestions for now; try again in ${wait || "a few"} s.`);
    } else if (!response.ok) {
      this.say(`No suggestion (${response.status}): ${body.detail || "error"}.`);
    } else {
      this.$("textarea").value = body.message;
      this.suggestion = { id: body.suggestion_id, text: body.message.trim() };
      const used = contextInWords(body.context_used);
      this.say(`Suggested, drawing on ${used}. Edit it or send it as it is.`, true);
    }
  }

  toggle() {
    const button = this.$(".toggle");
    if (this.client.stopped) {
      this.client.start();
      button.textContent = "Disconnect";
    } else {
      this.client.stop();
      button.textContent = "Connect";
    }
  }

  // ------------------------------------------------------------------ frames in

  onFrame(frame) {
    switch (frame.type) {
      case "presence":
        if (frame.partner === OTHER[this.role]) this.setPresence(frame.online);
        break;
      case "gesture_sent":
        this.requests.delete(frame.request_id);
        this.$("textarea").value = "";
        this.suggestion = null;
        this.showSent(frame.gesture, true);
        break;
      case "gesture_received":
        this.showReceived(frame.gesture);
        break;
      case "gesture_delivered":
        this.mark(frame.gesture_id, "delivered", `delivered ${clock(frame.delivered_at)}`);
        break;
      case "gesture_acknowledged": {
        const back = frame.response_gesture;
        const text = back ? `acknowledged: they sent back ${LABEL[back.gesture_type]}` : "acknowledged";
        this.mark(frame.gesture_id, "acknowledged", text);
        break;
      }
      case "gesture_acknowledged_confirm": {
        this.requests.delete(frame.request_id);
        this.acknowledged(frame.gesture_id, frame.response_gesture);
        if (frame.response_gesture) this.showSent(frame.response_gesture, true);
        break;
      }
      case "error":
        this.onError(frame);
        break;
    }
  }

  onError(frame) {
    const what = this.requests.get(frame.request_id);
    this.requests.delete(frame.request_id);
    if (what && what.ack) {
      for (const button of this.received.get(what.ack)?.querySelectorAll("button") || []) {
        button.disabled = false;
      }
    }
    const text = (ERROR_TEXT[frame.code] || ((m) => m))(frame.message);
    this.say(what && what.ack ? `Acknowledgement refused. ${text}` : text);
  }

  onStatus(status) {
    const conn = this.$(".conn");
    conn.dataset.state = status.state;
    switch (status.state) {
      case "connecting":
        conn.textContent = status.attempt ? `connecting (attempt ${status.attempt + 1})…` : "connecting…";
        break;
      case "connected":
        conn.textContent = "● connected";
        this.say("");
        this.catchUp();
        break;
      case "reconnecting": {
        const why = CLOSE_TEXT[status.code] || `closed ${status.code}`;
        const seconds = (status.delay / 1000).toFixed(1);
        conn.textContent = `disconnected (${why}): reconnecting in ${seconds} s`;
        this.setPresence(null);
        break;
      }
      case "closed":
        conn.textContent = status.code
          ? `closed: ${status.reason} (${status.code})`
          : "disconnected (you closed it)";
        this.setPresence(null);
        break;
    }
  }

  // After a (re)connect, frames sent meanwhile to the sender (delivered, acknowledged)
  // are not replayed: re-read this partner's recent gestures over HTTP to catch up.
  async catchUp() {
    const query = new URLSearchParams({ relationship_id: this.relationshipId, limit: "20" });
    try {
      const response = await fetch(`/api/gestures/recent?${query}`, {
        headers: { Authorization: `Bearer ${this.token}` },
      });
      if (!response.ok) return;
      const { gestures } = await response.json();
      for (const gesture of gestures.reverse()) {
        if (gesture.sent_by === this.role) this.showSent(gesture, false);
      }
    } catch {
      // Only a catch-up; the live frames still come.
    }
  }

  // ------------------------------------------------------------------ drawing

  say(text, info = false) {
    const line = this.$(".error");
    line.textContent = text;
    line.classList.toggle("info", info);
  }

  setPresence(online) {
    const dot = this.$(".dot");
    dot.dataset.online = String(online === true);
    this.$(".other-text").textContent =
      online === null
        ? `${this.otherName}: unknown while disconnected`
        : `${this.otherName} is ${online ? "online" : "offline"}`;
  }

  item(gesture, fresh) {
    const li = el(
      "li",
      { className: fresh ? "new" : "" },
      el(
        "div",
        { className: "line" },
        el("span", { className: "kind", textContent: LABEL[gesture.gesture_type] }),
        el("span", { className: "time", textContent: clock(gesture.sent_at) }),
      ),
    );
    li.dataset.gestureId = gesture.id;
    li.dataset.type = gesture.gesture_type;
    if (gesture.message) li.append(el("p", { className: "note", textContent: gesture.message }));
    if (gesture.ai_generated) {
      li.querySelector(".kind").append(" ", el("small", { className: "ai", textContent: "✨ suggested note" }));
      li.dataset.ai = "true";
    }
    return li;
  }

  showSent(gesture, fresh) {
    if (!this.sent.has(gesture.id)) {
      const li = this.item(gesture, fresh);
      const marks = el("div", { className: "marks" });
      for (const [mark, text] of [["sent", "sent"], ["delivered", "delivered"], ["acknowledged", "acknowledged"]]) {
        marks.append(el("span", { className: `m-${mark}`, textContent: text }), " · ");
      }
      marks.lastChild.remove();
      li.append(marks);
      li.dataset.sent = "true";
      this.sent.set(gesture.id, li);
      this.$(".sent").prepend(li);
      this.mark(gesture.id, "sent", "sent");
    }
    // What a row says: a mark already set from a frame (which says more) stays.
    const li = this.sent.get(gesture.id);
    if (gesture.delivered_at && li.dataset.delivered !== "true") {
      this.mark(gesture.id, "delivered", `delivered ${clock(gesture.delivered_at)}`);
    }
    if (gesture.acknowledged_at && li.dataset.acknowledged !== "true") {
      this.mark(gesture.id, "acknowledged", "acknowledged");
    }
  }

  mark(gestureId, mark, text) {
    const li = this.sent.get(gestureId);
    if (!li) return;
    li.dataset[mark] = "true";
    const span = li.querySelector(`.m-${mark}`);
    span.textContent = `✓ ${text}`;
    span.classList.add("on");
  }

  showReceived(gesture) {
    if (this.received.has(gesture.id)) return;
    const li = this.item(gesture, true);
    const only = el("button", { type: "button", className: "ack-only", textContent: "✓ Acknowledge" });
    only.addEventListener("click", () => this.acknowledge(gesture.id, null));
    const back = el("span", { className: "back" }, "or acknowledge and send back:");
    for (const type of Object.keys(LABEL)) {
      const button = el("button", { type: "button", textContent: LABEL[type] });
      button.dataset.ack = type;
      button.addEventListener("click", () => this.acknowledge(gesture.id, type));
      back.append(button);
    }
    li.append(el("div", { className: "ack" }, only, back));
    this.received.set(gesture.id, li);
    this.$(".received").prepend(li);
  }

  acknowledged(gestureId, response) {
    const li = this.received.get(gestureId);
    if (!li) return;
    li.dataset.acknowledged = "true";
    const text = response
      ? `✓ acknowledged; you sent back ${LABEL[response.gesture_type]}`
      : "✓ acknowledged; nothing sent back";
    li.querySelector(".ack").replaceWith(el("div", { className: "marks" }, el("span", { className: "on", textContent: text })));
  }
}

if (params.get("rel") && params.get("a") && params.get("b")) {
  start(params);
} else {
  const form = document.getElementById("setup");
  form.hidden = false;
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const values = new URLSearchParams(new FormData(form));
    for (const [k, v] of [...values]) if (!v) values.delete(k);
    location.hash = values.toString();
    location.reload();
  });
}
