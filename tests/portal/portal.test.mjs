// The portal in a real browser (Debian's Chromium through playwright-core), through its pages only,
// against a running server: PLINTH_URL names it, CHROMIUM the browser. Every main page is checked
// with axe-core for serious or critical accessibility violations. With PLINTH_SCREENSHOTS set, the
// main pages are saved there as PNGs (the README's screenshots).
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const require = createRequire(import.meta.url);
const AXE = readFileSync(require.resolve("axe-core/axe.min.js"), "utf8");
const BASE = process.env.PLINTH_URL ?? "http://127.0.0.1:8080";
const SCREENSHOTS = process.env.PLINTH_SCREENSHOTS;
const PASSWORD = "correct horse battery staple";

let browser;
before(async () => {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-dev-shm-usage"],
  });
});
after(async () => browser?.close());

let tenants = 0;
/** A new tenant signed up through the sign-up page, in a browser context of its own. */
async function signUp() {
  tenants += 1;
  // bypassCSP: only so that axe-core can be injected; the pages load no inline script themselves.
  const context = await browser.newContext({ viewport: { width: 1000, height: 720 }, bypassCSP: true });
  const page = await context.newPage();
  const email = `owner-${Date.now()}-${tenants}@example.com`;
  await page.goto(`${BASE}/portal`);
  assert.match(page.url(), /\/portal\/login/, "a visitor without a session is sent to log in");
  await page.getByRole("link", { name: "Create an account" }).click();
  const name = `Tenant ${tenants}`;
  await page.getByLabel("Organisation").fill(name);
  await page.getByLabel("Email").fill(email);
  await page.getByLabel("Password").fill(PASSWORD);
  await page.getByRole("button", { name: "Create account" }).click();
  await page.waitForURL(/\/portal\?welcome=1$/);
  return { context, page, email, name };
}

/** Creates a key on the keys page; returns its secret and id. */
async function createKey(page, name) {
  await page.getByRole("navigation", { name: "Portal" }).getByRole("link", { name: "API keys" }).click();
  await page.getByLabel("Name").fill(name);
  await page.getByRole("button", { name: "Create key" }).click();
  const secret = (await page.getByTestId("secret").textContent()).trim();
  const action = await page
    .getByRole("row", { name: new RegExp(name) })
    .locator("form")
    .getAttribute("action");
  return { secret, id: action.split("/")[3] };
}

/** axe-core on the page as it is: no serious or critical violations. */
async function accessible(page, what) {
  await page.addScriptTag({ content: AXE });
  const result = await page.evaluate(async () => window.axe.run(document, { resultTypes: ["violations"] }));
  const bad = result.violations.filter((v) => ["serious", "critical"].includes(v.impact));
  assert.deepEqual(
    bad.map((v) => `${v.id}: ${v.help} (${v.nodes.map((n) => n.target.join(" ")).join(", ")})`),
    [],
    `accessibility violations on ${what}`,
  );
}

async function screenshot(page, name) {
  if (!SCREENSHOTS) return;
  mkdirSync(SCREENSHOTS, { recursive: true });
  await page.screenshot({ path: join(SCREENSHOTS, `${name}.png`) });
}

async function classify(secret) {
  const response = await fetch(`${BASE}/v1/models/sentiment/classify`, {
    method: "POST",
    headers: { authorization: `Bearer ${secret}`, "content-type": "application/json" },
    body: JSON.stringify({ inputs: ["The portal works"] }),
  });
  assert.equal(response.status, 200, await response.text());
}

test("a new tenant signs up, creates a key, sees its calls in usage, subscribes to Pro and sees it on the statement", async () => {
  const { context, page } = await signUp();
  await assert.doesNotReject(page.getByRole("status").filter({ hasText: "Welcome" }).waitFor());
  assert.equal(await page.getByTestId("plan").textContent(), "Free");
  await accessible(page, "the overview");

  const key = await createKey(page, "backend");
  assert.match(key.secret, /^plk_live_/);
  await screenshot(page, "keys");
  await accessible(page, "the keys page");
  // The application uses the key, three times.
  for (let i = 0; i < 3; i++) await classify(key.secret);

  await page.getByRole("link", { name: "Usage" }).click();
  assert.equal(await page.getByTestId("total-calls").textContent(), "3");
  assert.match(await page.getByTestId("by-resource").textContent(), /sentiment/);
  await screenshot(page, "usage");
  await accessible(page, "the usage page");
  // The range picker: a range before today has none of them.
  await page.getByLabel("From", { exact: true }).fill("2020-01-01");
  await page.getByLabel("To", { exact: true }).fill("2020-01-31");
  await page.getByRole("button", { name: "Show" }).click();
  assert.equal(await page.getByTestId("total-calls").textContent(), "0");

  await page.getByRole("link", { name: "Billing" }).click();
  await page.getByRole("button", { name: "Switch to Pro" }).click();
  await page.waitForURL(/\/portal\/billing\?changed=1$/);
  assert.match(await page.getByRole("status").textContent(), /Pro plan/);
  const statement = page.getByTestId("statement").first();
  assert.equal(await statement.getByTestId("statement-plan").textContent(), "pro");
  assert.doesNotMatch(await statement.getByTestId("statement-total").textContent(), /\$0\.00/);
  await screenshot(page, "billing");
  await accessible(page, "the billing page");

  await page.getByRole("link", { name: "Overview" }).click();
  assert.equal(await page.getByTestId("plan").textContent(), "Pro");
  // Moving to a paid plan starts its first period: the free period's calls are behind it.
  assert.equal(await page.getByTestId("calls").textContent(), "0");
  await screenshot(page, "overview");
  await context.close();
});

test("the login page logs in, refuses a wrong password, and returns to the page asked for", async () => {
  const { context, page, email } = await signUp();
  await page.getByRole("button", { name: "Log out" }).click();
  await page.waitForURL(/\/portal\/login$/);
  await accessible(page, "the login page");
  await page.goto(`${BASE}/portal/usage`);
  await page.getByLabel("Email").fill(email);
  await page.getByLabel("Password").fill("not the password");
  await page.getByRole("button", { name: "Log in" }).click();
  assert.match(await page.getByRole("alert").textContent(), /do not match/);
  await page.getByLabel("Password").fill(PASSWORD);
  await page.getByRole("button", { name: "Log in" }).click();
  await page.waitForURL(/\/portal\/usage$/);
  await context.close();
});

test("a form sent without its CSRF token, or from another site, is refused and changes nothing", async () => {
  const { context, page } = await signUp();
  await page.goto(`${BASE}/portal/keys`);
  const without = await page.evaluate(async () => {
    const response = await fetch("/portal/keys", {
      method: "POST",
      body: new URLSearchParams({ name: "forged", inference: "on" }),
    });
    return response.status;
  });
  assert.equal(without, 403);
  // With the right token but from another origin, as a page elsewhere would post it.
  const csrf = await page.locator('form[action="/portal/keys"] input[name="csrf"]').inputValue();
  const cookies = await context.cookies();
  const session = cookies.find((c) => c.name === "__Host-plinth_session");
  assert.ok(session.httpOnly, "the session cookie is HttpOnly");
  assert.ok(session.secure, "the session cookie is Secure");
  assert.equal(session.sameSite, "Lax");
  const crossSite = await fetch(`${BASE}/portal/keys`, {
    method: "POST",
    headers: {
      cookie: `__Host-plinth_session=${session.value}`,
      origin: "https://attacker.example",
      "content-type": "application/x-www-form-urlencoded",
    },
    body: new URLSearchParams({ csrf, name: "forged", inference: "on" }),
  });
  assert.equal(crossSite.status, 403);
  // Neither Origin nor Sec-Fetch-Site: not a browser showing the portal.
  const headerless = await fetch(`${BASE}/portal/keys`, {
    method: "POST",
    headers: {
      cookie: `__Host-plinth_session=${session.value}`,
      "content-type": "application/x-www-form-urlencoded",
    },
    body: new URLSearchParams({ csrf, name: "forged", inference: "on" }),
  });
  assert.equal(headerless.status, 403);
  // Logging a victim into the attacker's account from another site (login CSRF).
  const loginCsrf = await fetch(`${BASE}/portal/login`, {
    method: "POST",
    redirect: "manual",
    headers: { origin: "https://attacker.example", "content-type": "application/x-www-form-urlencoded" },
    body: new URLSearchParams({ email: "attacker@example.com", password: PASSWORD }),
  });
  assert.equal(loginCsrf.status, 403);
  await page.reload();
  assert.equal(await page.getByRole("row", { name: /forged/ }).count(), 0, "no key was created");
  await context.close();
});

test("another tenant's key by URL is a 404 page, and the key keeps working", async () => {
  const owner = await signUp();
  const key = await createKey(owner.page, "theirs");
  const other = await signUp();
  await other.page.goto(`${BASE}/portal/keys`);
  await createKey(other.page, "mine");
  // The other tenant's own revoke form, pointed at the first tenant's key.
  await other.page.evaluate((id) => {
    document.querySelector('form[action$="/revoke"]').action = `/portal/keys/${id}/revoke`;
  }, key.id);
  const [response] = await Promise.all([
    other.page.waitForResponse((r) => r.url().endsWith(`/portal/keys/${key.id}/revoke`)),
    other.page.getByRole("button", { name: "Revoke mine" }).click(),
  ]);
  assert.equal(response.status(), 404);
  assert.equal(await other.page.locator(".error-page").getAttribute("data-code"), "not_found");
  await accessible(other.page, "the error page");
  await classify(key.secret);
  const missing = await other.page.goto(`${BASE}/portal/no-such-page`);
  assert.equal(missing.status(), 404);
  await owner.context.close();
  await other.context.close();
});

test("a session ended elsewhere is logged out of the portal", async () => {
  const { context, page } = await signUp();
  const session = (await context.cookies()).find((c) => c.name === "__Host-plinth_session");
  const logout = await fetch(`${BASE}/v1/logout`, {
    method: "POST",
    headers: { authorization: `Bearer ${session.value}` },
  });
  assert.equal(logout.status, 204);
  await page.goto(`${BASE}/portal/keys`);
  assert.match(page.url(), /\/portal\/login\?next=/);
  await context.close();
});

test("an owner adds a member, changes their role and removes them; the last owner stays an owner", async () => {
  const owner = await signUp();
  const colleague = await signUp();
  const page = owner.page;
  await page.getByRole("link", { name: "Members" }).click();
  await page.getByLabel("Email").fill(colleague.email);
  await page.getByLabel("Role", { exact: true }).selectOption("viewer");
  await page.getByRole("button", { name: "Add member" }).click();
  const role = page.getByLabel(`Role of ${colleague.email}`, { exact: true });
  assert.equal(await role.inputValue(), "viewer");
  await accessible(page, "the members page");
  await role.selectOption("developer");
  await page.getByRole("button", { name: `Change the role of ${colleague.email}` }).click();
  assert.equal(await page.getByLabel(`Role of ${colleague.email}`, { exact: true }).inputValue(), "developer");
  // The only owner cannot step down: the page says why.
  await page.getByLabel(`Role of ${owner.email}`, { exact: true }).selectOption("viewer");
  await page.getByRole("button", { name: `Change the role of ${owner.email}` }).click();
  assert.match(await page.getByRole("alert").textContent(), /owner/);
  await page.getByRole("button", { name: `Remove ${colleague.email}` }).click();
  await page.waitForURL(/\/portal\/members$/);
  assert.equal(await page.getByRole("row", { name: new RegExp(colleague.email) }).count(), 0);
  await screenshot(page, "members");
  await owner.context.close();
  await colleague.context.close();
});

test("models: upload one with a progress bar, see a refused upload's reason, delete it", async () => {
  const models = process.env.PLINTH_MODELS_DIR;
  const { context, page } = await signUp();
  await page.getByRole("link", { name: "Models" }).click();
  assert.match(await page.getByTestId("models").textContent(), /sentiment/);
  await accessible(page, "the models page");
  // The built-in sentiment model's files, uploaded as the tenant's own.
  await page.getByLabel("Manifest (JSON)").fill(
    JSON.stringify({ name: "support-tone", task: "text-classification", labels: ["negative", "neutral", "positive"] }),
  );
  await page.getByLabel("Model (.onnx)").setInputFiles(join(models, "sentiment.onnx"));
  await page.getByLabel("Tokenizer (tokenizer.json, text models)").setInputFiles(join(models, "tokenizer.json"));
  await page.getByRole("button", { name: "Upload" }).click();
  await page.waitForURL(/\/portal\/models\?uploaded=support-tone$/);
  assert.match(await page.getByRole("status").textContent(), /support-tone/);
  assert.equal(await page.getByRole("row", { name: /support-tone/ }).count(), 1);
  assert.ok(await page.locator("progress#upload-progress").count(), "the page has its progress bar");
  await screenshot(page, "models");
  // A file that is not a model: the page says why, nothing is added.
  await page.getByLabel("Manifest (JSON)").fill(JSON.stringify({ name: "broken", task: "raw" }));
  await page.getByLabel("Model (.onnx)").setInputFiles({ name: "broken.onnx", mimeType: "application/octet-stream", buffer: Buffer.from("not a model") });
  await page.getByRole("button", { name: "Upload" }).click();
  await page.getByRole("alert").waitFor();
  assert.match(await page.getByRole("alert").textContent(), /refused/);
  assert.equal(await page.getByRole("row", { name: /broken/ }).count(), 0);
  await page.getByRole("button", { name: "Delete support-tone" }).click();
  await page.waitForURL(/\/portal\/models$/);
  assert.equal(await page.getByRole("row", { name: /support-tone/ }).count(), 0);
  await context.close();
});

/** A small labelled set as JSON Lines: `perLabel` short texts for each label. */
function supportTickets(labels, perLabel) {
  const says = {
    billing: (i) => `I was charged twice on invoice ${i}, please refund the payment`,
    shipping: (i) => `My parcel ${i} has not arrived yet, where is the delivery`,
    login: (i) => `I cannot sign in to account ${i}, the password reset email never comes`,
  };
  return labels
    .flatMap((label) => Array.from({ length: perLabel }, (_, i) => JSON.stringify({ text: says[label](i + 1), label })))
    .join("\n");
}

test("fine-tuning: upload a dataset, see its summary, train, follow the job to its evaluation and deploy it", async () => {
  const { context, page } = await signUp();
  await nav(page, "Training").click();
  await accessible(page, "the training page");

  // A file refused on upload: the page says why, nothing is added.
  await page.getByLabel("Dataset (.jsonl or .csv)").setInputFiles({
    name: "one-label.jsonl",
    mimeType: "application/jsonl",
    buffer: Buffer.from(supportTickets(["billing"], 12)),
  });
  await page.getByLabel("Dataset name", { exact: true }).fill("one label");
  await page.getByRole("button", { name: "Upload dataset" }).click();
  await page.getByRole("alert").waitFor();
  assert.match(await page.getByRole("alert").textContent(), /refused: every example has the label `billing`/);
  // A malformed line: the message names it.
  await page.getByLabel("Dataset (.jsonl or .csv)").setInputFiles({
    name: "broken.jsonl",
    mimeType: "application/jsonl",
    buffer: Buffer.from(`${supportTickets(["billing", "login"], 12)}\n{"text": "no label"}`),
  });
  await page.getByLabel("Dataset name", { exact: true }).fill("broken");
  await page.getByRole("button", { name: "Upload dataset" }).click();
  // The page the upload answers replaces this one (which has the previous refusal).
  await page.getByRole("alert").filter({ hasText: /line \d+: / }).waitFor();
  assert.match(await page.getByRole("alert").textContent(), /refused: line 25: /);
  assert.equal(await page.getByTestId("datasets").count(), 0, "no dataset was added");

  // A good one, picked from disk as a tenant would.
  const file = join(mkdtempSync(join(tmpdir(), "plinth-portal-")), "tickets.jsonl");
  writeFileSync(file, supportTickets(["billing", "shipping", "login"], 12));
  await page.getByLabel("Dataset (.jsonl or .csv)").setInputFiles(file);
  await page.getByLabel("Dataset name", { exact: true }).fill("support tickets");
  await page.getByRole("button", { name: "Upload dataset" }).click();
  await page.waitForURL(/\/portal\/training\?uploaded=/);
  assert.match(await page.getByRole("status").textContent(), /support tickets/);
  const row = page.getByTestId("datasets").getByRole("row", { name: /support tickets/ });
  const [format, examples, labels] = await row.getByRole("cell").allTextContents();
  assert.deepEqual([format, examples, labels], ["jsonl", "36", "billing (12), shipping (12), login (12)"]);

  // A model name the platform refuses: said next to the form, which keeps what was typed.
  await page.getByLabel("Dataset", { exact: true }).selectOption({ label: "support tickets (36 examples)" });
  await page.getByLabel("Model name").fill("Support Tone");
  await page.getByLabel(/^Most epochs/).fill("40");
  await page.getByRole("button", { name: "Start training" }).click();
  assert.match(await page.getByRole("alert").textContent(), /not started: model: /);
  assert.equal(await page.getByLabel(/^Most epochs/).inputValue(), "40");
  await page.getByLabel("Model name").fill("ticket-topic");
  await page.getByLabel(/^Learning rate/).fill("0.05");
  await page.getByRole("button", { name: "Start training" }).click();
  await page.waitForURL(/\/portal\/training\/jobs\/ftj_/);
  const jobUrl = page.url();

  // The page follows the job by itself until it ends.
  await page.getByTestId("job-status").filter({ hasText: "succeeded" }).waitFor({ timeout: 180_000 });
  assert.match(await page.getByTestId("job-progress").textContent(), /^epoch \d+\/40$/);
  assert.match(await page.getByTestId("accuracy").textContent(), /^\d+\.\d%$/);
  assert.match(await page.getByTestId("macro-f1").textContent(), /^[01]\.\d{3}$/);
  assert.equal(await page.getByTestId("label-metrics").locator("tbody tr").count(), 3);
  assert.equal(await page.getByTestId("confusion").locator("tbody tr").count(), 3);
  assert.match(await page.getByTestId("events").textContent(), /succeeded/);
  assert.match(await page.getByRole("main").textContent(), /learning_rate0\.05/);
  assert.ok(await page.getByRole("link", { name: "Download the model (ONNX)" }).count());
  await screenshot(page, "training-job");
  await accessible(page, "a training job's page");

  await page.getByRole("button", { name: "Deploy as ticket-topic" }).click();
  await page.waitForURL(/\?deployed=1$/);
  assert.match(await page.getByTestId("deployed").textContent(), /Deployed as version 1 of ticket-topic/);
  assert.equal(await page.getByRole("button", { name: /^Deploy/ }).count(), 0, "deployed once");
  await page.getByTestId("deployed").getByRole("link", { name: "ticket-topic" }).click();
  await page.waitForURL(/\/portal\/models$/);
  assert.equal(await page.getByRole("row", { name: /ticket-topic/ }).count(), 1);

  // The jobs table links to the job, with its accuracy.
  await nav(page, "Training").click();
  const job = page.getByTestId("jobs").getByRole("row", { name: /ticket-topic/ });
  assert.match(await job.textContent(), /succeeded/);
  assert.match(await job.textContent(), /\d+\.\d%/);
  await screenshot(page, "training");
  // Another tenant's job by URL is a 404 page.
  const other = await signUp();
  assert.equal((await other.page.goto(jobUrl)).status(), 404);
  await other.context.close();
  await context.close();
});

test("an operator reviews a plugin version: what it asks for is shown, a rejection needs a reason, approval empties the queue", async () => {
  const pending = process.env.PLINTH_PENDING_PLUGIN;
  // Tenants have no review queue.
  const tenant = await signUp();
  assert.equal(await tenant.page.getByRole("link", { name: "Review queue" }).count(), 0);
  const refused = await tenant.page.goto(`${BASE}/portal/review`);
  assert.equal(refused.status(), 403);
  await tenant.context.close();

  const context = await browser.newContext({ viewport: { width: 1000, height: 720 }, bypassCSP: true });
  const page = await context.newPage();
  await page.goto(`${BASE}/portal/login`);
  await page.getByLabel("Email").fill(process.env.PLINTH_ADMIN_EMAIL);
  await page.getByLabel("Password").fill(process.env.PLINTH_ADMIN_PASSWORD);
  await page.getByRole("button", { name: "Log in" }).click();
  await page.getByRole("link", { name: "Review queue" }).click();
  const card = page.getByRole("article", { name: pending });
  assert.match(await card.textContent(), /Capabilities/);
  await screenshot(page, "review");
  await accessible(page, "the review queue");
  const [rejection] = await Promise.all([
    page.waitForResponse((r) => r.request().method() === "POST"),
    card.getByRole("button", { name: `Reject ${pending}` }).click(),
  ]);
  assert.equal(rejection.status(), 422, "a rejection without a reason is refused");
  await page.goto(`${BASE}/portal/review`);
  await page.getByRole("article", { name: pending }).getByRole("button", { name: `Approve ${pending}` }).click();
  await page.waitForURL(/\/portal\/review$/);
  assert.match(await page.getByRole("main").textContent(), /Nothing is waiting for review/);
  await context.close();
});

test("a tenant finds a plugin, approves each capability and model it asks for, installs it and uninstalls it", async () => {
  const { context, page } = await signUp();
  await page.getByRole("link", { name: "Marketplace" }).click();
  await page.getByLabel("Search plugins").fill("sentiment");
  await page.getByRole("button", { name: "Search" }).click();
  await page.getByRole("link", { name: "sentiment-monitor" }).click();
  await accessible(page, "a plugin's page");
  // Approving only part of what it asks for installs nothing, and says what is missing.
  await page.getByRole("checkbox", { name: /^inference:/ }).check();
  await page.getByRole("button", { name: "Install sentiment-monitor" }).click();
  assert.match(await page.getByRole("alert").textContent(), /needs `kv`/);
  for (const box of await page.getByRole("checkbox").all()) await box.check();
  await page.getByLabel(/^Settings/).fill(JSON.stringify({ topic: "ACME" }));
  await page.getByRole("button", { name: "Install sentiment-monitor" }).click();
  await page.waitForURL(/\/portal\/plugins$/);
  const row = page.getByRole("row", { name: /sentiment-monitor/ });
  assert.match(await row.textContent(), /inference, kv, config; models: sentiment/);
  await screenshot(page, "plugins");
  await accessible(page, "the installed plugins");
  await page.getByRole("button", { name: "Uninstall sentiment-monitor" }).click();
  await page.waitForURL(/\/portal\/plugins$/);
  assert.equal(await page.getByRole("row", { name: /sentiment-monitor/ }).count(), 0);
  await context.close();
});

test("an author's earnings page is where Stripe Connect returns; without Stripe, onboarding says why", async () => {
  const { context, page } = await signUp();
  await page.getByRole("link", { name: "Earnings" }).click();
  assert.equal(await page.getByTestId("earned").textContent(), "$0.00");
  await accessible(page, "the earnings page");
  await page.goto(`${BASE}/portal/author?connect=done`);
  assert.match(await page.getByRole("status").textContent(), /payout details/);
  const [onboarding] = await Promise.all([
    page.waitForResponse((r) => r.request().method() === "POST"),
    page.getByRole("button", { name: "Set up payouts with Stripe" }).click(),
  ]);
  assert.equal(onboarding.status(), 409, "local billing has no Stripe account to onboard with");
  await context.close();
});

test("pages fit a phone-width screen and start with a skip link", async () => {
  const { context, page } = await signUp();
  await page.setViewportSize({ width: 360, height: 740 });
  for (const path of ["/portal", "/portal/keys", "/portal/usage", "/portal/models", "/portal/training", "/portal/marketplace", "/portal/plugins", "/portal/billing", "/portal/members", "/portal/author", "/portal/author/plugins"]) {
    await page.goto(`${BASE}${path}`);
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    if (overflow > 1) await screenshot(page, `narrow-${path.split("/").pop()}`);
    assert.ok(overflow <= 1, `${path} scrolls sideways by ${overflow}px`);
  }
  await page.keyboard.press("Tab");
  assert.equal(await page.evaluate(() => document.activeElement.textContent), "Skip to content");
  await context.close();
});

/** A link of the portal's navigation. */
function nav(page, name) {
  return page.getByRole("navigation", { name: "Portal" }).getByRole("link", { name, exact: true });
}

/** Logs in through the login page, in a browser context of its own. */
async function logIn(email, password) {
  const context = await browser.newContext({ viewport: { width: 1000, height: 720 }, bypassCSP: true });
  const page = await context.newPage();
  await page.goto(`${BASE}/portal/login`);
  await page.getByLabel("Email").fill(email);
  await page.getByLabel("Password").fill(password);
  await page.getByRole("button", { name: "Log in" }).click();
  await page.waitForURL(/\/portal$/);
  return { context, page };
}

test("an author publishes a plugin, an operator approves it, a tenant installs it with approvals and tries it, the author sees earnings", async () => {
  const dir = process.env.PLINTH_JOURNEY_PLUGIN_DIR;
  const manifest = JSON.parse(readFileSync(join(dir, "plugin.json"), "utf8"));
  const release = `${manifest.name} ${manifest.version}`;

  // The author creates a listing and publishes a version through the pages.
  const author = await signUp();
  await nav(author.page, "My plugins").click();
  await author.page.getByLabel(/^Name/).fill(manifest.name);
  await author.page.getByLabel("Description").fill(manifest.description);
  await author.page.getByRole("button", { name: "Create listing" }).click();
  await author.page.waitForURL(/\/portal\/author\/plugins$/);
  const listing = author.page.getByRole("article", { name: manifest.name });
  // Something that is not a component is refused, and the page says why.
  await listing.getByLabel("Manifest (plugin.json)").setInputFiles(join(dir, "plugin.json"));
  await listing.getByLabel("Component (.wasm)").setInputFiles({ name: "plugin.wasm", mimeType: "application/wasm", buffer: Buffer.from("not wasm") });
  await listing.getByRole("button", { name: "Publish" }).click();
  await author.page.getByRole("alert").waitFor();
  assert.match(await author.page.getByRole("alert").textContent(), /refused/);
  await author.page.goto(`${BASE}/portal/author/plugins`);
  await listing.getByLabel("Manifest (plugin.json)").setInputFiles(join(dir, "plugin.json"));
  await listing.getByLabel("Component (.wasm)").setInputFiles(join(dir, "plugin.wasm"));
  await listing.getByRole("button", { name: "Publish" }).click();
  await author.page.waitForURL(/\/portal\/author\/plugins\?published=/);
  assert.match(await author.page.getByRole("status").textContent(), /waits for review/);
  const version = listing.getByRole("row", { name: new RegExp(manifest.version) });
  assert.equal(await version.getByTestId("review-status").textContent(), "pending");
  await screenshot(author.page, "my-plugins");
  await accessible(author.page, "my plugins");

  // An operator approves it from the review queue.
  const operator = await logIn(process.env.PLINTH_ADMIN_EMAIL, process.env.PLINTH_ADMIN_PASSWORD);
  await nav(operator.page, "Review queue").click();
  await operator.page.getByRole("article", { name: release }).getByRole("button", { name: `Approve ${release}` }).click();
  await operator.page.waitForURL(/\/portal\/review$/);
  await author.page.reload();
  assert.equal(await version.getByTestId("review-status").textContent(), "approved");

  // A tenant on a paid plan installs it, approving what it asks for, and tries it.
  const tenant = await signUp();
  await nav(tenant.page, "Billing").click();
  await tenant.page.getByRole("button", { name: "Switch to Pro" }).click();
  await tenant.page.waitForURL(/changed=1$/);
  await nav(tenant.page, "Marketplace").click();
  await tenant.page.getByLabel("Search plugins").fill(manifest.name);
  await tenant.page.getByRole("button", { name: "Search" }).click();
  await tenant.page.getByRole("link", { name: manifest.name }).click();
  for (const box of await tenant.page.getByRole("checkbox").all()) await box.check();
  await tenant.page.getByRole("button", { name: `Install ${manifest.name}` }).click();
  await tenant.page.waitForURL(/\/portal\/plugins$/);
  await tenant.page.getByRole("link", { name: manifest.name }).click();
  const installationUrl = tenant.page.url();
  assert.match(installationUrl, /\/portal\/plugins\/[^/]+$/);
  await accessible(tenant.page, "an installation's page");
  // Not JSON: the page says so, and nothing is billed.
  await tenant.page.getByLabel("Request (JSON)").fill("{ topic: ACME");
  await tenant.page.getByRole("button", { name: "Send" }).click();
  assert.match(await tenant.page.getByRole("alert").textContent(), /not JSON/);
  await tenant.page.getByLabel("Request (JSON)").fill(JSON.stringify({ topic: "ACME", texts: ["ACME beats earnings expectations"] }));
  await tenant.page.getByRole("button", { name: "Send" }).click();
  const answer = JSON.parse(await tenant.page.getByTestId("try-answer").textContent());
  assert.equal(answer.topic, "ACME");
  assert.equal(answer.scored.length, 1);
  await screenshot(tenant.page, "try-it");
  // The plugin's own refusal is shown as it would be answered.
  await tenant.page.getByLabel("Request (JSON)").fill(JSON.stringify({ texts: ["no topic"] }));
  await tenant.page.getByRole("button", { name: "Send" }).click();
  assert.match(await tenant.page.getByRole("alert").textContent(), /topic/);
  // Settings are edited on the same page.
  await tenant.page.getByLabel("Settings (JSON object)").fill(JSON.stringify({ window: 10 }));
  await tenant.page.getByRole("button", { name: "Save settings" }).click();
  assert.match(await tenant.page.getByLabel("Settings (JSON object)").inputValue(), /"window": 10/);

  // Another tenant's installation by URL is a 404 page, for reading and for invoking.
  const csrf = await author.page.locator('form[action="/portal/logout"] input[name="csrf"]').inputValue();
  const elsewhere = await author.page.goto(installationUrl);
  assert.equal(elsewhere.status(), 404);
  const invoked = await author.page.evaluate(
    async ([url, csrf]) => (await fetch(`${url}/try`, { method: "POST", body: new URLSearchParams({ csrf, input: "{}" }) })).status,
    [installationUrl, csrf],
  );
  assert.equal(invoked, 404);

  // The author sees the call in earnings.
  await author.page.goto(`${BASE}/portal/author`);
  assert.notEqual(await author.page.getByTestId("earned").textContent(), "$0.00");
  assert.equal(await author.page.getByRole("row", { name: new RegExp(manifest.name) }).count(), 1);

  // The operator finds the tenant, on Pro, with its call, and the books balance.
  await nav(operator.page, "Tenants").click();
  await operator.page.getByLabel(/^Find a tenant/).fill(tenant.email);
  await operator.page.getByRole("button", { name: "Search" }).click();
  const rows = operator.page.getByTestId("tenants").locator("tbody tr");
  assert.equal(await rows.count(), 1);
  assert.match(await rows.textContent(), /Pro/);
  await accessible(operator.page, "the tenants page");
  await nav(operator.page, "Billing operations").click();
  assert.equal(await operator.page.getByTestId("billing-mode").textContent(), "local");
  assert.match(await operator.page.getByTestId("balanced").textContent(), /^Balanced/);
  await accessible(operator.page, "billing operations");
  // The pages met on this journey fit a phone-width screen too.
  for (const [party, path] of [[tenant, new URL(installationUrl).pathname], [operator, "/portal/admin/tenants"], [operator, "/portal/admin/billing"], [operator, "/portal/review"]]) {
    await party.page.setViewportSize({ width: 360, height: 740 });
    await party.page.goto(`${BASE}${path}`);
    const overflow = await party.page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 1, `${path} scrolls sideways by ${overflow}px`);
  }
  // Operators' pages are not for tenants.
  for (const path of ["/portal/admin/tenants", "/portal/admin/billing"]) {
    assert.equal((await tenant.page.goto(`${BASE}${path}`)).status(), 403);
  }
  for (const party of [author, operator, tenant]) await party.context.close();
});

test("the overview lists the tenant's recent failed calls with their codes and request ids", async () => {
  const { context, page } = await signUp();
  const key = await createKey(page, "failing");
  const response = await fetch(`${BASE}/v1/models/no-such-model/classify`, {
    method: "POST",
    headers: { authorization: `Bearer ${key.secret}`, "content-type": "application/json" },
    body: JSON.stringify({ inputs: ["hello"] }),
  });
  assert.equal(response.status, 404);
  const requestId = (await response.json()).error.request_id;
  // Recorded off the request path: give it a moment.
  let table;
  for (let i = 0; i < 20; i++) {
    await page.goto(`${BASE}/portal`);
    table = page.getByTestId("recent-errors");
    if (await table.count()) break;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  const row = await table.textContent();
  assert.match(row, /POST \/v1\/models\/no-such-model\/classify/);
  assert.match(row, /404/);
  assert.ok(row.includes(requestId), "the request id is shown");
  await accessible(page, "the overview with errors");
  await context.close();
});

test("a member of two organisations switches between them, and the session they left ends", async () => {
  const owner = await signUp();
  const colleague = await signUp();
  await nav(owner.page, "Members").click();
  await owner.page.getByLabel("Email").fill(colleague.email);
  await owner.page.getByLabel("Role", { exact: true }).selectOption("developer");
  await owner.page.getByRole("button", { name: "Add member" }).click();
  await owner.page.waitForURL(/\/portal\/members$/);

  const page = colleague.page;
  const before = (await colleague.context.cookies()).find((c) => c.name === "__Host-plinth_session").value;
  await page.reload();
  const current = () => page.locator("#switch-tenant").evaluate((s) => s.options[s.selectedIndex].text);
  assert.equal(await current(), colleague.name);
  await accessible(page, "a page with the organisation switcher");
  const option = (name) =>
    page.locator("#switch-tenant option", { hasText: new RegExp(`^${name} \\(`) }).getAttribute("value");
  await page.getByLabel("Organisation", { exact: true }).selectOption(await option(owner.name));
  await page.getByRole("button", { name: "Switch" }).click();
  await page.waitForURL(/\/portal$/);
  assert.equal(await current(), owner.name);
  // A developer there: members are listed, not managed.
  await nav(page, "Members").click();
  assert.equal(await page.getByRole("row", { name: new RegExp(owner.email) }).count(), 1);
  assert.equal(await page.getByRole("button", { name: "Add member" }).count(), 0);
  // The session it switched from no longer works anywhere.
  const old = await fetch(`${BASE}/v1/tenant`, { headers: { authorization: `Bearer ${before}` } });
  assert.equal(old.status, 401);
  // And back.
  await page.getByLabel("Organisation", { exact: true }).selectOption(await option(colleague.name));
  await page.getByRole("button", { name: "Switch" }).click();
  await page.waitForURL(/\/portal$/);
  assert.equal(await current(), colleague.name);
  await owner.context.close();
  await colleague.context.close();
});

test("the API reference renders and works under its content security policy, and an injected script does not run", async () => {
  // No bypassCSP here: the page must work under the policy it is served with.
  const context = await browser.newContext();
  const page = await context.newPage();
  const violations = [];
  page.on("console", (message) => {
    if (/Content Security Policy/i.test(message.text())) violations.push(message.text());
  });
  const response = await page.goto(`${BASE}/docs/`);
  assert.match(response.headers()["content-security-policy"], /script-src 'self'/);
  // Swagger UI built the operations from /openapi.json, and one opens.
  const signup = page.locator(".opblock-summary-path", { hasText: "/v1/signup" }).first();
  await signup.waitFor();
  await signup.click();
  await page.getByRole("button", { name: "Try it out" }).waitFor();
  assert.deepEqual(violations, [], "the reference's own scripts and styles are allowed");
  // What an injection into the page would do: an inline script, refused by the policy.
  await page.evaluate(() => {
    const script = document.createElement("script");
    script.textContent = "window.injected = true";
    document.body.appendChild(script);
  });
  assert.equal(await page.evaluate(() => window.injected), undefined, "an inline script ran");
  await context.close();
});
