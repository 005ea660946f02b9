// chatloop's embeddable feedback widget: thumbs, a comment box and (for answers with several choices) a "prefer
// this one" control under an answer shown in someone else's page, talking to /v1/feedback and /v1/comparisons.
//
//   <script src="https://chatloop.example.com/widget.js"></script>
//   <script>ChatloopFeedback.attach(answerElement, {completionId: "chatcmpl-…", choiceIndex: 0, apiKey: "cl-…"})</script>
//
// The page's origin must be in CHATLOOP_WIDGET_ORIGINS and its key a user-role key (README, The feedback widget).
// Styling: every element has a `chatloop-feedback__…` class and state in attributes (aria-pressed, data-state);
// the default look is one <style> of zero-specificity rules (:where), so any page rule wins; pass
// {styles: false} to leave it out. No inline styles.
(function () {
  "use strict";

  // Where the API is: the origin this script was loaded from, unless the page says otherwise.
  const SCRIPT_ORIGIN = document.currentScript ? new URL(document.currentScript.src).origin : window.location.origin;
  const STYLE_ID = "chatloop-feedback-style";
  const CSS = `
:where(.chatloop-feedback) { display: flex; flex-wrap: wrap; align-items: center; gap: .4em; margin-top: .5em;
  font: inherit; font-size: .9em; }
:where(.chatloop-feedback button) { font: inherit; cursor: pointer; border: 1px solid #bbb; border-radius: .4em;
  background: #fff; padding: .2em .6em; }
:where(.chatloop-feedback button[aria-pressed="true"]) { background: #dde8ff; border-color: #4a6fd6; }
:where(.chatloop-feedback button:focus-visible, .chatloop-feedback textarea:focus-visible) {
  outline: 2px solid #4a6fd6; outline-offset: 2px; }
:where(.chatloop-feedback__comment-box) { display: flex; gap: .4em; flex-basis: 100%; }
:where(.chatloop-feedback__comment-box[hidden]) { display: none; }
:where(.chatloop-feedback__comment) { flex: 1; min-height: 2.5em; font: inherit; }
:where(.chatloop-feedback__status[data-state="error"]) { color: #b00020; }
`;
  const LABELS = {
    group: "Rate this answer", up: "Good answer", down: "Bad answer", comment: "Add a comment",
    commentInput: "Comment on this answer", send: "Send comment", prefer: "Prefer this answer",
    recorded: "Thanks, recorded", preferred: "Thanks, preference recorded", pickThumb: "Pick a thumb first",
    sending: "Sending…",
  };

  function element(tag, className, attributes, text) {
    const node = document.createElement(tag);
    node.className = className;
    for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, value);
    if (text) node.textContent = text;
    return node;
  }

  function button(className, label, text) {
    return element("button", className, { type: "button", "aria-label": label }, text);
  }

  let counter = 0;

  function attach(target, options) {
    if (!(target instanceof Element)) throw new TypeError("ChatloopFeedback.attach: give the element showing the answer");
    if (!options || !options.completionId) throw new TypeError("ChatloopFeedback.attach: completionId is required");
    const labels = Object.assign({}, LABELS, options.labels);
    const api = (options.apiBase || SCRIPT_ORIGIN).replace(/\/$/, "");
    const choiceIndex = options.choiceIndex || 0;
    if (options.styles !== false && !document.getElementById(STYLE_ID)) {
      const style = element("style", "", { id: STYLE_ID }, CSS);
      document.head.prepend(style); // first, so the page's own sheets come later as well
    }

    const id = `chatloop-feedback-${++counter}`;
    const root = element("div", "chatloop-feedback", { role: "group", "aria-label": labels.group });
    const up = button("chatloop-feedback__thumb chatloop-feedback__thumb--up", labels.up, "👍");
    const down = button("chatloop-feedback__thumb chatloop-feedback__thumb--down", labels.down, "👎");
    up.setAttribute("aria-pressed", "false");
    down.setAttribute("aria-pressed", "false");
    const toggle = button("chatloop-feedback__comment-toggle", labels.comment, "💬");
    toggle.setAttribute("aria-expanded", "false");
    toggle.setAttribute("aria-controls", `${id}-comment`);
    const box = element("div", "chatloop-feedback__comment-box", { id: `${id}-comment`, hidden: "" });
    const input = element("textarea", "chatloop-feedback__comment", { "aria-label": labels.commentInput, rows: "2" });
    const send = button("chatloop-feedback__send", labels.send, "Send");
    box.append(input, send);
    const status = element("span", "chatloop-feedback__status", { role: "status", "aria-live": "polite" });
    root.append(up, down, toggle);
    let prefer = null;
    if ((options.choices || 1) > 1) {
      prefer = button("chatloop-feedback__prefer", labels.prefer, "Prefer this one");
      prefer.setAttribute("aria-pressed", "false");
      root.append(prefer);
    }
    root.append(status, box);
    target.append(root);

    let rating = null;

    function show(text, state) {
      status.textContent = text;
      status.dataset.state = state;
    }

    async function post(path, body) {
      const headers = { "content-type": "application/json" };
      if (options.apiKey) headers.authorization = `Bearer ${options.apiKey}`;
      show(labels.sending, "sending");
      root.dataset.state = "sending";
      try {
        const response = await fetch(`${api}${path}`, { method: "POST", headers, body: JSON.stringify(body) });
        const answer = await response.json().catch(() => ({}));
        if (!response.ok) throw new Error((answer.error && answer.error.message) || `HTTP ${response.status}`);
        root.dataset.state = "recorded";
        return answer;
      } catch (err) {
        root.dataset.state = "error";
        show(err.message || String(err), "error");
        throw err;
      }
    }

    function withComment(body) {
      const comment = input.value.trim();
      return comment ? Object.assign(body, { comment }) : body;
    }

    async function vote(value) {
      await post("/v1/feedback", withComment({ completion_id: options.completionId, choice_index: choiceIndex, rating: value }));
      rating = value;
      up.setAttribute("aria-pressed", String(value === "up"));
      down.setAttribute("aria-pressed", String(value === "down"));
      show(labels.recorded, "recorded");
    }

    const quietly = (promise) => promise.catch(() => {}); // the status element already says what went wrong
    up.addEventListener("click", () => quietly(vote("up")));
    down.addEventListener("click", () => quietly(vote("down")));
    toggle.addEventListener("click", () => {
      const open = box.hidden;
      box.hidden = !open;
      toggle.setAttribute("aria-expanded", String(open));
      if (open) input.focus();
    });
    input.addEventListener("keydown", (event) => {
      if (event.key === "Escape") {
        box.hidden = true;
        toggle.setAttribute("aria-expanded", "false");
        toggle.focus();
      } else if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        send.click();
      }
    });
    send.addEventListener("click", () => {
      if (!rating) {
        show(labels.pickThumb, "error");
        up.focus();
        return;
      }
      quietly(vote(rating)); // the same thumb again, now with the comment: it replaces the earlier vote
    });
    if (prefer) {
      prefer.addEventListener("click", () => quietly(
        post("/v1/comparisons", withComment({ completion_id: options.completionId, preferred: choiceIndex }))
          .then(() => {
            prefer.setAttribute("aria-pressed", "true");
            show(labels.preferred, "recorded");
          })));
    }
    return { element: root, destroy: () => root.remove() };
  }

  window.ChatloopFeedback = { attach };
})();
