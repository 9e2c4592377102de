// The dashboard's smoke test in Firefox (Debian's firefox-esr), driven over WebDriver
// BiDi by puppeteer-core (tools/browser/install.sh installs both).  Run by
// tests/browser/test_firefox.py, which starts the server and checks what this prints.
//
//   node smoke.mjs PUPPETEER_CORE_DIR FIREFOX LOGIN_LINK SERVER_URL JOB_ID SLOW_ID
//
// Prints one JSON object: what it saw at each step ({"ok": true, ...} or the error).
import { createRequire } from "node:module";
import path from "node:path";

const [moduleDir, firefox, link, serverUrl, jobId, slowId] = process.argv.slice(2);
const require = createRequire(path.join(moduleDir, "package.json"));
const puppeteer = require("puppeteer-core");

const seen = { ok: false, problems: [], outside: [] };
const TIMEOUT = 20_000;

async function text(page, selector) {
  return page.$eval(selector, (el) => el.textContent);
}

async function waitText(page, selector, expected) {
  await page.waitForFunction(
    (sel, want) => {
      const el = document.querySelector(sel);
      return el !== null && el.textContent.includes(want);
    },
    { timeout: TIMEOUT, polling: 50 },
    selector,
    expected,
  );
}

const browser = await puppeteer.launch({
  browser: "firefox",
  executablePath: firefox,
  headless: true,
  protocol: "webDriverBiDi",
  extraPrefsFirefox: { "browser.shell.checkDefaultBrowser": false },
});
try {
  seen.version = await browser.version();
  const page = await browser.newPage();
  await page.setViewport({ width: 1280, height: 800 });
  page.on("pageerror", (error) => seen.problems.push(`page error: ${error.message}`));
  page.on("dialog", async (dialog) => {
    if (dialog.type() === "confirm") await dialog.accept();
    else {
      seen.problems.push(`unexpected ${dialog.type()} dialog: ${dialog.message()}`);
      await dialog.dismiss();
    }
  });
  page.on("request", (request) => {
    if (!request.url().startsWith(serverUrl + "/")) seen.outside.push(request.url());
  });

  // The one-time link logs in and leaves a clean URL.
  await page.goto(link);
  await waitText(page, "#live", "live");
  seen.url = page.url();
  seen.who = await text(page, "#who");

  // The job submitted with the CLI is in the table, its name as text, and goes on
  // to RUNNING without a reload.
  const row = `#job-rows tr[data-id="${jobId}"]`;
  await page.waitForSelector(row, { timeout: TIMEOUT });
  seen.name = await text(page, `${row} td.name`);
  seen.images = await page.$$eval("#jobs img", (els) => els.length);
  await waitText(page, `${row} .state`, "RUNNING");
  seen.running = true;

  // A job's page: its script and its output followed live; cancel, confirmed.
  await page.goto(`${serverUrl}/jobs/${slowId}`);
  await waitText(page, "#log-output", "tick-1");
  await waitText(page, "#log-output", "tick-2");
  seen.script = await text(page, "#job-script");
  await page.click("#act-cancel");
  await waitText(page, "#job-fields .state", "CANCELLED");
  seen.cancelled = true;
  seen.ok = true;
} catch (error) {
  seen.error = String(error && error.stack ? error.stack : error);
} finally {
  await browser.close();
}
console.log(JSON.stringify(seen));
