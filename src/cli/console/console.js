// reel console: live updates (one EventSource per page) and the timeline's marks.
"use strict";

function liveTasks(table) {
  const mode = table.dataset.live; // "prepend": new tasks appear at the top
  const channel = table.dataset.channel || null;
  const source = new EventSource("/live");
  source.addEventListener("change", (e) => {
    const t = JSON.parse(e.data);
    const row = table.querySelector(`tr[data-task="${t.id}"]`);
    if (row) {
      const cell = row.querySelector("td.status");
      if (cell.textContent !== t.display) {
        cell.textContent = t.display;
        cell.dataset.status = t.status;
        row.cells[4].textContent = t.attempt;
        row.cells[5].textContent = t.updated_at;
        row.classList.remove("flash");
        void row.offsetWidth;
        row.classList.add("flash");
      }
    } else if (mode === "prepend" && (!channel || channel === t.channel)) {
      const tr = document.createElement("tr");
      tr.dataset.task = t.id;
      const link = document.createElement("a");
      link.href = `/tasks/${t.id}`;
      const code = document.createElement("code");
      code.textContent = t.id.slice(0, 8);
      link.appendChild(code);
      const cells = [link, t.workflow, t.channel, t.display, String(t.attempt), t.updated_at];
      cells.forEach((value, i) => {
        const td = document.createElement("td");
        if (typeof value === "string") td.textContent = value; else td.appendChild(value);
        if (i === 3) { td.className = "status"; td.dataset.status = t.status; }
        tr.appendChild(td);
      });
      tr.classList.add("flash");
      table.tBodies[0].prepend(tr);
    }
  });
  source.addEventListener("reload", () => location.reload());
  reloadOnReconnect(source);
}

// A stream that reconnects (the console restarted, the network blinked) may have missed
// changes: the page reloads rather than show a stale state.
function reloadOnReconnect(source) {
  let opened = false;
  source.addEventListener("open", () => {
    if (opened) location.reload();
    opened = true;
  });
}

function liveTask(facts) {
  const task = facts.dataset.task;
  const source = new EventSource(`/live?task=${encodeURIComponent(task)}`);
  let pending = null;
  // At most one refresh a second, however fast the task moves.
  source.addEventListener("change", () => {
    if (pending) return;
    pending = setTimeout(async () => {
      pending = null;
      const response = await fetch(location.pathname, { credentials: "same-origin" });
      if (!response.ok) return;
      const page = new DOMParser().parseFromString(await response.text(), "text/html");
      for (const id of ["facts", "timeline", "payloads"]) {
        const fresh = page.getElementById(id);
        const here = document.getElementById(id);
        if (fresh && here) here.replaceWith(fresh);
      }
      const events = page.querySelector("table.events");
      const old = document.querySelector("table.events");
      if (events && old) old.replaceWith(events);
      const actions = page.querySelector("section.actions");
      const oldActions = document.querySelector("section.actions");
      if (oldActions) {
        if (actions) oldActions.replaceWith(actions); else oldActions.remove();
      }
      wireMarks();
      if (document.getElementById("facts").dataset.live !== "on") source.close();
    }, 1000);
  });
  source.addEventListener("reload", () => location.reload());
  reloadOnReconnect(source);
}

function wireMarks() {
  const detail = document.getElementById("detail");
  document.querySelectorAll("#timeline .mark").forEach((mark) => {
    mark.addEventListener("click", () => {
      const source = document.getElementById(`ev-${mark.dataset.v}`);
      if (!source || !detail) return;
      detail.replaceChildren(source.cloneNode(true));
      document.querySelectorAll("#timeline .mark.selected").forEach((m) => m.classList.remove("selected"));
      mark.classList.add("selected");
    });
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const table = document.getElementById("tasks");
  if (table) liveTasks(table);
  const facts = document.getElementById("facts");
  if (facts && facts.dataset.live === "on") liveTask(facts);
  wireMarks();
});
