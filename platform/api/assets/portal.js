// Copy buttons: <button data-copy="id-of-element">. The page works without this script.
document.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-copy]");
  if (!button) return;
  const source = document.getElementById(button.dataset.copy);
  try {
    await navigator.clipboard.writeText(source.textContent.trim());
    button.textContent = "Copied";
  } catch {
    const range = document.createRange();
    range.selectNodeContents(source);
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    button.textContent = "Selected: press Ctrl+C";
  }
});

// Uploads with a progress bar: <form data-upload> is sent with XMLHttpRequest, and the page it answers
// with replaces this one. Without script, the form posts as usual.
document.addEventListener("submit", (event) => {
  const form = event.target.closest("form[data-upload]");
  if (!form) return;
  event.preventDefault();
  const progress = form.querySelector("progress");
  const button = form.querySelector("button[type=submit]");
  const body = new FormData(form);
  for (const [name, value] of [...body.entries()]) {
    if (value instanceof File && value.name === "") body.delete(name);
  }
  const request = new XMLHttpRequest();
  request.open("POST", form.action);
  request.upload.addEventListener("progress", (e) => {
    if (!e.lengthComputable) return;
    progress.hidden = false;
    progress.value = Math.round((e.loaded / e.total) * 100);
  });
  request.addEventListener("load", () => {
    window.history.replaceState(null, "", request.responseURL);
    document.open();
    document.write(request.responseText);
    document.close();
    window.scrollTo(0, 0);
  });
  request.addEventListener("error", () => {
    button.disabled = false;
    button.textContent = "Upload failed: try again";
  });
  button.disabled = true;
  button.textContent = "Uploading…";
  request.send(body);
});
