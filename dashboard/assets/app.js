// copilot dashboard: keeps the page current without reloading it.
//
// The manager sends a server-sent event `change` on /ui/events when it connects and whenever jobs
// or agents change; its id is a stamp of that state. A page knows the stamp it was rendered at
// (<body data-stamp>); on a newer one it fetches itself again with the header
// `x-copilot-partial: 1` (the manager answers with the contents of <main> only and the stamp in
// `x-copilot-stamp`) and swaps them in. If the event stream breaks, the page polls every 10 s
// until it is back. Served by the manager itself: no other script, no CDN.
(function () {
  "use strict";
  var main = document.getElementById("main");
  var live = document.getElementById("live");
  if (!main || !live) {
    return; // the login page
  }
  var stamp = document.body.dataset.stamp || "";
  var refreshes = 0;
  var busy = false;
  var again = false;
  document.body.dataset.refreshes = "0";

  function setLive(state, title) {
    live.className = "live " + state;
    live.title = title;
  }

  function refresh() {
    if (busy) {
      again = true;
      return;
    }
    busy = true;
    fetch(location.href, {
      headers: { "x-copilot-partial": "1" },
      credentials: "same-origin",
      cache: "no-store",
    })
      .then(function (r) {
        if (r.status === 401) {
          location.reload(); // the session ended: the manager shows the login form
          return null;
        }
        if (!r.ok) {
          throw new Error("HTTP " + r.status);
        }
        stamp = r.headers.get("x-copilot-stamp") || stamp;
        return r.text();
      })
      .then(function (html) {
        if (html === null) {
          return;
        }
        if (html !== main.innerHTML) {
          main.innerHTML = html;
        }
        refreshes += 1;
        document.body.dataset.refreshes = String(refreshes);
      })
      .catch(function (e) {
        setLive("stale", "could not refresh: " + e.message);
      })
      .then(function () {
        busy = false;
        if (again) {
          again = false;
          refresh();
        }
      });
  }

  var poller = null;
  function poll(on) {
    if (on && poller === null) {
      poller = setInterval(refresh, 10000);
    } else if (!on && poller !== null) {
      clearInterval(poller);
      poller = null;
    }
  }

  if (!window.EventSource) {
    setLive("polling", "refreshing every 10 s");
    poll(true);
    return;
  }
  var source = new EventSource("/ui/events");
  source.addEventListener("open", function () {
    setLive("on", "pages update by themselves");
    poll(false);
  });
  source.addEventListener("change", function (e) {
    if (e.lastEventId !== stamp) {
      refresh();
    }
  });
  source.addEventListener("error", function () {
    setLive("stale", "lost the manager's event stream; polling every 10 s");
    poll(true);
  });
})();
