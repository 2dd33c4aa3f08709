//! A small Chrome DevTools Protocol driver for the web tests: it launches a headless Chromium
//! with a throw-away profile, connects to its page target over a plain ws:// socket and clicks
//! and types the way a person does, with trusted input events (`Input.dispatchMouseEvent`,
//! `Input.dispatchKeyEvent`, `Input.insertText`) rather than `element.click()` in a script.
//!
//! Everything is synchronous: a command is sent, then messages are read until its response
//! arrives; the events read meanwhile are kept (page load, uncaught exceptions, console errors).
//! Every wait has a deadline, so a dead or stuck browser fails the test instead of hanging it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

/// How long one command may take to be answered, and a page to load.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// A headless Chromium and a DevTools connection to its one page.
pub struct Browser {
    child: Child,
    /// Holds the profile (`profile/`) and Chromium's stderr (`stderr.log`).
    dir: tempfile::TempDir,
    ws: WebSocket<TcpStream>,
    next_id: u64,
    /// Every event read so far, as the protocol's `{"method", "params"}` objects.
    events: Vec<Value>,
}

impl Browser {
    /// Launch headless chromium (`bin`) on about:blank with a W x H window and viewport, wait
    /// (up to 30 s) for `<profile>/DevToolsActivePort`, find the page target with
    /// `GET /json/list`, connect to it, and enable the Page and Runtime domains.
    pub fn launch(bin: &Path, width: u32, height: u32) -> Browser {
        let dir = tempfile::tempdir().expect("browser temp dir");
        let profile = dir.path().join("profile");
        let log = std::fs::File::create(dir.path().join("stderr.log")).expect("stderr.log");
        let mut child = Command::new(bin)
            .args(
                "--headless --no-sandbox --disable-gpu --disable-dev-shm-usage --no-first-run \
                 --disable-background-networking --disable-component-update --disable-sync \
                 --remote-debugging-port=0"
                    .split_whitespace(),
            )
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(format!("--window-size={width},{height}"))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            // Its own process group, so Drop ends the wrapper script and all of its children.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        // A launch that fails still ends the browser (Drop does once there is a Browser).
        let connected = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            connect(&mut child, dir.path())
        }));
        let ws = connected.unwrap_or_else(|panic| {
            kill_group(&mut child);
            std::panic::resume_unwind(panic)
        });
        let mut browser = Browser {
            child,
            dir,
            ws,
            next_id: 1,
            events: Vec::new(),
        };
        browser.call("Page.enable", json!({}));
        browser.call("Runtime.enable", json!({}));
        browser.set_viewport(width, height, false);
        browser
    }

    /// Page.navigate to `url` and wait (30 s) for Page.loadEventFired. A navigation within the
    /// document (only the fragment changes) has no load event and returns at once.
    pub fn goto(&mut self, url: &str) {
        self.events.retain(|e| e["method"] != "Page.loadEventFired");
        let r = self.call("Page.navigate", json!({ "url": url }));
        if let Some(err) = r["errorText"].as_str() {
            panic!("navigating to {url}: {err}");
        }
        if r["loaderId"].is_null() {
            return;
        }
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        while !self
            .events
            .iter()
            .any(|e| e["method"] == "Page.loadEventFired")
        {
            if !self.read_one(deadline) {
                panic!("{url} did not load within {COMMAND_TIMEOUT:?}");
            }
        }
    }

    /// Runtime.evaluate `js` (awaiting a promise) and return its value by value (`null` for
    /// `undefined`). Panics with the exception's text if the script throws.
    pub fn eval(&mut self, js: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": js, "returnByValue": true, "awaitPromise": true }),
        );
        if let Some(ex) = r.get("exceptionDetails") {
            panic!("script threw: {}\nscript: {js}", exception_text(ex));
        }
        r["result"].get("value").cloned().unwrap_or(Value::Null)
    }

    /// Evaluate `js` every ~100 ms until its value is truthy and return that value. On timeout
    /// panic with `what` and the page's text, so the failure says what the page showed.
    pub fn wait_for(&mut self, what: &str, js: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.eval(js);
            if truthy(&v) {
                return v;
            }
            if Instant::now() >= deadline {
                let body = self.eval("document.body ? document.body.innerText : ''");
                let body: String = body
                    .as_str()
                    .unwrap_or_default()
                    .chars()
                    .take(4000)
                    .collect();
                panic!("timed out after {timeout:?} waiting for {what}; the page shows:\n{body}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Click the element matching `css` with real mouse events at the centre of its box, after
    /// waiting (10 s) for it to exist with a non-zero box and scrolling it to the middle of the
    /// viewport. Panics if something else covers that point.
    pub fn click(&mut self, css: &str) {
        let sel = serde_json::to_string(css).unwrap();
        let js = format!(
            "(() => {{ const e = document.querySelector({sel}); if (!e) return null;
              let r = e.getBoundingClientRect(); if (!(r.width > 0 && r.height > 0)) return null;
              e.scrollIntoView({{ block: 'center', inline: 'center', behavior: 'instant' }});
              r = e.getBoundingClientRect();
              const x = r.left + r.width / 2, y = r.top + r.height / 2;
              const at = document.elementFromPoint(x, y);
              return {{ x, y, hit: !!at && (at === e || e.contains(at)),
                        at: at ? at.outerHTML.slice(0, 300) : 'nothing' }}; }})()"
        );
        let what = format!("{css} to be visible");
        let p = self.wait_for(&what, &js, Duration::from_secs(10));
        assert!(
            p["hit"] == true,
            "{css} is covered at its centre by {}",
            p["at"]
        );
        let (x, y) = (&p["x"], &p["y"]);
        self.call(
            "Input.dispatchMouseEvent",
            json!({ "type": "mouseMoved", "x": x, "y": y }),
        );
        for (kind, buttons) in [("mousePressed", 1), ("mouseReleased", 0)] {
            let ev = json!({ "type": kind, "x": x, "y": y, "button": "left",
                             "buttons": buttons, "clickCount": 1 });
            self.call("Input.dispatchMouseEvent", ev);
        }
    }

    /// Click the field `css` to focus it, select all its text (Ctrl+A) and replace it with
    /// `text` (Input.insertText; Backspace when `text` is empty); checks the field's value.
    pub fn type_text(&mut self, css: &str, text: &str) {
        self.click(css);
        let a = json!({ "modifiers": 2, "key": "a", "code": "KeyA", "windowsVirtualKeyCode": 65 });
        let mut down = a.clone();
        down["type"] = json!("keyDown");
        down["commands"] = json!(["selectAll"]);
        self.call("Input.dispatchKeyEvent", down);
        let mut up = a;
        up["type"] = json!("keyUp");
        self.call("Input.dispatchKeyEvent", up);
        if text.is_empty() {
            let bs = json!({ "key": "Backspace", "code": "Backspace", "windowsVirtualKeyCode": 8 });
            self.key("rawKeyDown", &bs);
            self.key("keyUp", &bs);
        } else {
            self.call("Input.insertText", json!({ "text": text }));
        }
        let sel = serde_json::to_string(css).unwrap();
        let value = self.eval(&format!("document.querySelector({sel}).value"));
        assert_eq!(value, json!(text), "the value of {css} after typing");
    }

    /// Press Enter (rawKeyDown, char "\r", keyUp) in the focused element.
    pub fn press_enter(&mut self) {
        let enter = json!({ "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13 });
        self.key("rawKeyDown", &enter);
        let mut ch = enter.clone();
        ch["text"] = json!("\r");
        ch["unmodifiedText"] = json!("\r");
        self.key("char", &ch);
        self.key("keyUp", &enter);
    }

    /// The innerText of the first element matching `css`, "" if there is none.
    pub fn text(&mut self, css: &str) -> String {
        let sel = serde_json::to_string(css).unwrap();
        let js = format!(
            "(() => {{ const e = document.querySelector({sel}); return e ? e.innerText : ''; }})()"
        );
        self.eval(&js).as_str().unwrap_or_default().to_string()
    }

    /// Emulate a `width` x `height` viewport (device scale factor 1), as a phone if `mobile`.
    pub fn set_viewport(&mut self, width: u32, height: u32, mobile: bool) {
        let p =
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile });
        self.call("Emulation.setDeviceMetricsOverride", p);
    }

    /// Write a PNG of the whole page (beyond the viewport too) to `path`.
    pub fn screenshot(&mut self, path: &Path) {
        let p = json!({ "format": "png", "captureBeyondViewport": true });
        let r = self.call("Page.captureScreenshot", p);
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("screenshot data"))
            .expect("screenshot is base64");
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// The uncaught exceptions and console.error messages seen so far, as text.
    pub fn page_errors(&self) -> Vec<String> {
        let mut errors = Vec::new();
        for e in &self.events {
            let p = &e["params"];
            if e["method"] == "Runtime.exceptionThrown" {
                errors.push(exception_text(&p["exceptionDetails"]));
            } else if e["method"] == "Runtime.consoleAPICalled" && p["type"] == "error" {
                let args = p["args"].as_array().map(Vec::as_slice).unwrap_or_default();
                let parts: Vec<String> = args.iter().map(remote_text).collect();
                errors.push(format!("console.error: {}", parts.join(" ")));
            }
        }
        errors
    }

    fn key(&mut self, kind: &str, params: &Value) {
        let mut p = params.clone();
        p["type"] = json!(kind);
        self.call("Input.dispatchKeyEvent", p);
    }

    /// Send a command and read until its response; keep the events read meanwhile. Panics if
    /// the browser answers with an error or not within [`COMMAND_TIMEOUT`].
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({ "id": id, "method": method, "params": params }).to_string();
        self.ws
            .send(Message::text(msg))
            .unwrap_or_else(|e| panic!("sending {method}: {e}"));
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            if let Some(pos) = self.events.iter().rposition(|m| m["id"] == id) {
                let reply = self.events.remove(pos);
                if let Some(err) = reply.get("error") {
                    panic!("{method} failed: {err}");
                }
                return reply["result"].clone();
            }
            if !self.read_one(deadline) {
                panic!("no answer to {method} within {COMMAND_TIMEOUT:?}");
            }
        }
    }

    /// Read one message into `events` (responses too, which `call` takes out again); false if
    /// none came before `deadline`.
    fn read_one(&mut self, deadline: Instant) -> bool {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.ws.get_ref().set_read_timeout(Some(left)).unwrap();
            match self.ws.read() {
                Ok(Message::Text(t)) => {
                    let v: Value = serde_json::from_str(t.as_str()).expect("CDP message is JSON");
                    self.events.push(v);
                    return true;
                }
                Ok(Message::Close(c)) => panic!("the browser closed the connection: {c:?}"),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("reading from the browser: {e}\n{}", self.stderr()),
            }
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        kill_group(&mut self.child);
    }
}

/// Wait for the browser started in `dir` to listen, find its page target and connect to it.
fn connect(child: &mut Child, dir: &Path) -> WebSocket<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let stderr = || std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
    let port_file = dir.join("profile/DevToolsActivePort");
    let port: u16 = loop {
        // The file is written as "PORT\n/devtools/browser/ID": wait for both lines.
        let text = std::fs::read_to_string(&port_file).unwrap_or_default();
        if let (Some(port), Some(_)) = (text.lines().next(), text.lines().nth(1)) {
            break port.trim().parse().expect("DevToolsActivePort has a port");
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("chromium exited ({status}) before listening:\n{}", stderr());
        }
        assert!(
            Instant::now() < deadline,
            "no {} after 30 s; chromium's stderr:\n{}",
            port_file.display(),
            stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let ws_url = loop {
        let targets = http_get_json(port, "/json/list");
        let page = targets.as_array().and_then(|t| {
            t.iter()
                .find(|t| t["type"] == "page")
                .and_then(|t| t["webSocketDebuggerUrl"].as_str())
        });
        if let Some(url) = page {
            break url.to_string();
        }
        assert!(Instant::now() < deadline, "no page target: {targets}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to devtools");
    stream.set_nodelay(true).ok();
    let config = WebSocketConfig::default()
        .max_message_size(Some(256 << 20))
        .max_frame_size(Some(256 << 20));
    let (ws, _) = tungstenite::client::client_with_config(ws_url.as_str(), stream, Some(config))
        .unwrap_or_else(|e| panic!("websocket handshake with {ws_url}: {e}"));
    ws
}

/// SIGKILL the browser's process group (it was started as its leader) and reap it.
fn kill_group(child: &mut Child) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    let _ = child.kill();
    let _ = child.wait();
}

/// `GET path` from the DevTools HTTP endpoint, as JSON (`null` if it does not answer yet). The
/// endpoint keeps the connection open, so the body is read up to its Content-Length.
fn http_get_json(port: u16, path: &str) -> Value {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return Value::Null;
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return Value::Null;
    }
    let mut resp = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let text = String::from_utf8_lossy(&resp);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head.lines().find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            });
            if len.is_some_and(|n| body.len() >= n) {
                return serde_json::from_str(body).unwrap_or(Value::Null);
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return Value::Null,
            Ok(n) => resp.extend_from_slice(&chunk[..n]),
        }
    }
}

/// "Uncaught Error: boom\n    at ..." from a Runtime.ExceptionDetails.
fn exception_text(ex: &Value) -> String {
    let text = ex["text"].as_str().unwrap_or("exception");
    match ex["exception"]["description"].as_str() {
        Some(d) => format!("{text} {d}"),
        None => format!("{text} {}", remote_text(&ex["exception"])),
    }
}

/// A Runtime.RemoteObject as text: its value, else its description.
fn remote_text(o: &Value) -> String {
    match (&o["value"], o["description"].as_str()) {
        (Value::String(s), _) => s.clone(),
        (Value::Null, Some(d)) => d.to_string(),
        (Value::Null, None) => o["type"].as_str().unwrap_or("null").to_string(),
        (v, _) => v.to_string(),
    }
}

/// JavaScript's truthiness of a value returned by value.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}
