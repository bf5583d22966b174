// Opens the EPTS plot page in headless Chromium and waits until it plots the expected number
// of points (the samples are sent by the Rust test once this prints `page-open`), then saves a
// screenshot. Usage: node plot.mjs <page url> <screenshot path> <points> [timeout ms]
import { chromium } from "playwright-core";

const [url, screenshot, expected, timeoutArg] = process.argv.slice(2);
const timeout = Number(timeoutArg || 45000);
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";

const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1100, height: 700 } });
  const failures = [];
  page.on("pageerror", (e) => failures.push(String(e)));
  page.on("requestfailed", (r) => failures.push("request failed: " + r.url()));
  await page.goto(url, { waitUntil: "load", timeout });
  // The page polls the API every second; it has loaded once it shows a status.
  await page.waitForFunction(() => document.getElementById("status").textContent !== "loading…", null, { timeout });
  console.log("page-open");
  await page.waitForFunction(
    (n) => Number(document.getElementById("chart").dataset.points || 0) >= n,
    Number(expected),
    { timeout, polling: 100 },
  );
  const points = await page.evaluate(() => Number(document.getElementById("chart").dataset.points));
  const canvas = await page.locator("#chart canvas").count();
  const status = await page.textContent("#status");
  await page.screenshot({ path: screenshot, fullPage: true });
  if (failures.length) throw new Error("page errors: " + failures.join("; "));
  if (canvas < 1) throw new Error("no chart canvas");
  console.log(`plotted ${points} canvas ${canvas} status ${status}`);
} finally {
  await browser.close();
}
