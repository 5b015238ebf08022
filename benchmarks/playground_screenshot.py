"""The playground screenshots of docs/serving.md: serve a run, generate in headless Chromium, colour by expert, hover.

    python benchmarks/playground_screenshot.py --run-dir RUN [--prompt TEXT] [--seed 3] [--out docs/playground.png]
    python benchmarks/playground_screenshot.py --run-dir CHAT_RUN --chat "Write a story about a dog named Max." \
        --out docs/playground-chat.png

With `--chat MESSAGE` the page is in chat mode and sends MESSAGE (the run must be chat-trained). Needs Chromium and
its driver (`apt-get install chromium chromium-driver`) and selenium (the test extra).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from tinyseek.loading import load_from_arguments
from tinyseek.serve.app import create_app
from tinyseek.serve.background import BackgroundServer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--prompt", default="Once upon a time, there was a little girl named Lily. She")
    parser.add_argument("--chat", metavar="MESSAGE", help="chat mode: send MESSAGE instead of completing --prompt")
    parser.add_argument("--max-tokens", default="60")
    parser.add_argument("--seed", default="3")
    parser.add_argument("--view", default="layer 1", help="the layer picker's choice, e.g. 'all layers (strip)'")
    parser.add_argument("--hover", type=int, default=12, help="the generated token whose tooltip is shown")
    parser.add_argument("--out", type=Path, default=Path("docs/playground.png"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    args.model = None
    model, tokenizer = load_from_arguments(args, "cpu")
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1360,790",
                 "--force-device-scale-factor=1", "--hide-scrollbars"):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium")
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    with BackgroundServer(create_app(model, tokenizer, model_name=args.run_dir.resolve().name)) as server:
        driver = webdriver.Chrome(options=options, service=service)
        try:
            driver.get(server.url + "/")
            wait = WebDriverWait(driver, 120)
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#layer option"))
            if args.chat is not None:
                driver.find_element(By.ID, "mode-chat").click()
            text_field, button = ("message", "send") if args.chat is not None else ("prompt", "generate")
            fields = ((text_field, args.chat or args.prompt), ("max-tokens", args.max_tokens), ("seed", args.seed))
            for field, value in fields:
                driver.find_element(By.ID, field).clear()
                driver.find_element(By.ID, field).send_keys(value)
            driver.find_element(By.ID, "colour-experts").click()
            Select(driver.find_element(By.ID, "layer")).select_by_visible_text(args.view)
            driver.find_element(By.ID, button).click()
            wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") in ("done", "error"))
            status = driver.find_element(By.ID, "status")
            if status.get_attribute("data-state") == "error":
                raise SystemExit(f"the playground says: {status.text}")
            tokens = driver.find_elements(By.CSS_SELECTOR, ".output:not([hidden]) .token")
            ActionChains(driver).move_to_element(tokens[min(args.hover, len(tokens) - 1)]).perform()
            args.out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.out))
            print(f"wrote {args.out}")
        finally:
            driver.quit()


if __name__ == "__main__":
    main()
