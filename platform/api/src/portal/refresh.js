// Pages that follow work in progress: every element with `data-refresh` and an id is fetched again
// every two seconds and replaced when it changed. Once the fresh page no longer marks it (the work
// ended), the whole page loads once more, with what can be done now. Without script, the page's
// <noscript> refresh does the same.
const regions = [...document.querySelectorAll("[data-refresh][id]")];
if (regions.length) {
  const tick = async () => {
    try {
      const response = await fetch(window.location.href, { cache: "no-store" });
      if (response.ok) {
        const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
        for (const region of regions) {
          const next = fresh.getElementById(region.id);
          if (!next?.hasAttribute("data-refresh")) {
            window.location.reload();
            return;
          }
          if (next.innerHTML !== region.innerHTML) region.innerHTML = next.innerHTML;
        }
      }
    } catch {
      // Offline for a moment: try again at the next tick.
    }
    setTimeout(tick, 2000);
  };
  setTimeout(tick, 2000);
}
