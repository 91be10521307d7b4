//! The page at `/`: a prompt, an edit and a seed; the same seed drawn before
//! and after the edit, side by side.

use axum::response::Html;

/// `GET /`.
pub(super) async fn page() -> Html<&'static str> {
    Html(PAGE)
}

const PAGE: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>time-onnx</title>
<style>
body { font: 15px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 60em; padding: 0 1em; }
label { display: block; margin: .5em 0; }
input[type=text] { width: 30em; }
figure { display: inline-block; margin: 1em 1em 0 0; text-align: center; }
img { width: 256px; height: 256px; image-rendering: pixelated; background: #eee; }
#status { color: #555; min-height: 1.4em; }
</style>
</head>
<body>
<h1>time-onnx</h1>
<p>Edit one assumption of the model and see the same seed before and after.</p>
<form id="form">
<label>Prompt <input type="text" id="prompt" value="a circle" required></label>
<label>Edit: source <input type="text" id="src" value="a circle" required></label>
<label>Edit: destination <input type="text" id="dst" value="a blue circle" required></label>
<label>Seed <input type="number" id="seed" value="0" min="0"></label>
<label>Steps <input type="number" id="steps" value="25" min="1"></label>
<label>Bearer token (if the server needs one) <input type="password" id="token"></label>
<button type="submit" id="go">Draw</button>
</form>
<p id="status"></p>
<figure><img id="before" alt="before the edit"><figcaption>before</figcaption></figure>
<figure><img id="after" alt="after the edit"><figcaption>after</figcaption></figure>
<script>
const $ = (id) => document.getElementById(id);
async function call(path, body) {
  const headers = { "Content-Type": "application/json" };
  if ($("token").value) headers["Authorization"] = "Bearer " + $("token").value;
  const r = await fetch(path, { method: "POST", headers, body: JSON.stringify(body) });
  if (!r.ok) {
    let why = r.statusText;
    try { why = (await r.json()).error; } catch (e) {}
    throw new Error(path + ": " + r.status + " " + why);
  }
  return r;
}
async function image(edits) {
  const r = await call("/v1/images", {
    prompt: $("prompt").value, seed: Number($("seed").value),
    steps: Number($("steps").value), edits,
  });
  return URL.createObjectURL(await r.blob());
}
$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("go").disabled = true;
  try {
    $("status").textContent = "computing the edit…";
    const edit = await (await call("/v1/edits", { src: $("src").value, dst: $("dst").value })).json();
    $("status").textContent = "drawing…";
    const [before, after] = await Promise.all([image([]), image([edit.id])]);
    $("before").src = before;
    $("after").src = after;
    $("status").textContent = "edit " + edit.id.slice(0, 12) + ": done";
  } catch (e) {
    $("status").textContent = String(e.message || e);
  } finally {
    $("go").disabled = false;
  }
});
</script>
</body>
</html>
"#;
