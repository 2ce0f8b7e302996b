//! An incremental `text/event-stream` parser, as the WHATWG HTML standard
//! ("Server-sent events", §9.2.6) reads a stream: lines end with CRLF, LF or
//! CR (a CRLF split across two chunks is one line end); a blank line
//! dispatches the event; a line starting with `:` is a comment (servers send
//! heartbeats so); `field: value` drops one space after the colon; a line
//! without a colon is a field with an empty value; `data` lines join with
//! `\n`; an event whose data buffer is empty is not dispatched (as a browser
//! does not); the event type defaults to `message`; a leading UTF-8 BOM is
//! skipped; unknown fields are ignored.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, or `message` when absent or empty.
    pub event: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
    /// The `id:` field given in this event's own lines, if any (the
    /// standard's "last event ID", which persists across events, is
    /// [`SseParser::last_event_id`]).
    pub id: Option<String>,
}

/// Feeds on chunks as they arrive; keeps a partial line between them.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    /// The previous chunk ended with CR: a LF opening the next one belongs to it.
    after_cr: bool,
    /// The first line has been seen (the BOM is only skipped there).
    started: bool,
    event: String,
    data: String,
    id: Option<String>,
    last_event_id: Option<String>,
    retry_ms: Option<u64>,
    comments: u64,
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses `bytes` and calls `on_event` for each event they complete.
    pub fn feed(&mut self, bytes: &[u8], mut on_event: impl FnMut(SseEvent)) {
        let mut rest = bytes;
        while !rest.is_empty() {
            if self.after_cr {
                self.after_cr = false;
                if rest[0] == b'\n' {
                    rest = &rest[1..];
                    continue;
                }
            }
            match rest.iter().position(|&b| b == b'\n' || b == b'\r') {
                None => {
                    self.line.extend_from_slice(rest);
                    break;
                }
                Some(end) => {
                    self.line.extend_from_slice(&rest[..end]);
                    self.after_cr = rest[end] == b'\r';
                    rest = &rest[end + 1..];
                    let line = std::mem::take(&mut self.line);
                    self.process_line(&line, &mut on_event);
                    // Keep the allocation for the next line.
                    self.line = line;
                    self.line.clear();
                }
            }
        }
    }

    /// Comment lines seen so far (heartbeats such as `: ping`).
    pub fn comments(&self) -> u64 {
        self.comments
    }

    /// The standard's last event ID: the latest `id:` field, kept across events.
    #[allow(dead_code)] // A complete parser; the load generator needs only events.
    pub fn last_event_id(&self) -> Option<&str> {
        self.last_event_id.as_deref()
    }

    /// The latest valid `retry:` field, in milliseconds.
    #[allow(dead_code)] // A complete parser; the load generator needs only events.
    pub fn retry_ms(&self) -> Option<u64> {
        self.retry_ms
    }

    fn process_line(&mut self, line: &[u8], on_event: &mut impl FnMut(SseEvent)) {
        let mut line = line;
        if !self.started {
            self.started = true;
            if let Some(stripped) = line.strip_prefix(BOM) {
                line = stripped;
            }
        }
        if line.is_empty() {
            self.dispatch(on_event);
            return;
        }
        if line[0] == b':' {
            self.comments += 1;
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"event" => self.event = String::from_utf8_lossy(value).into_owned(),
            b"data" => {
                self.data.push_str(&String::from_utf8_lossy(value));
                self.data.push('\n');
            }
            // An id with a NUL is ignored.
            b"id" if !value.contains(&0) => {
                let id = String::from_utf8_lossy(value).into_owned();
                self.last_event_id = Some(id.clone());
                self.id = Some(id);
            }
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                if let Some(ms) = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()) {
                    self.retry_ms = Some(ms);
                }
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, on_event: &mut impl FnMut(SseEvent)) {
        let id = self.id.take();
        if self.data.is_empty() {
            self.event.clear();
            return;
        }
        let mut data = std::mem::take(&mut self.data);
        if data.ends_with('\n') {
            data.pop();
        }
        let event = if self.event.is_empty() {
            "message".to_string()
        } else {
            std::mem::take(&mut self.event)
        };
        on_event(SseEvent { event, data, id });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_chunks(chunks: &[&[u8]]) -> (Vec<SseEvent>, SseParser) {
        let mut parser = SseParser::new();
        let mut events = Vec::new();
        for chunk in chunks {
            parser.feed(chunk, |event| events.push(event));
        }
        (events, parser)
    }

    fn parse(text: &str) -> Vec<SseEvent> {
        parse_chunks(&[text.as_bytes()]).0
    }

    fn event(event: &str, data: &str, id: Option<&str>) -> SseEvent {
        SseEvent {
            event: event.into(),
            data: data.into(),
            id: id.map(Into::into),
        }
    }

    /// What the server sends: flags first, heartbeats, a prompt with an id.
    const SERVER: &str = "event: flags\ndata: {\"etag\": \"abc\"}\n\n\
        : ping\n\n\
        event: prompt\nid: 7\ndata: {\"key\":\"upgrade\",\"title\":\"You have used 3 of 5 Projects\"}\n\n\
        event: entitlements\ndata: {\"projects\":{\"used\":3}}\n\n";

    fn server_events() -> Vec<SseEvent> {
        vec![
            event("flags", r#"{"etag": "abc"}"#, None),
            event(
                "prompt",
                r#"{"key":"upgrade","title":"You have used 3 of 5 Projects"}"#,
                Some("7"),
            ),
            event("entitlements", r#"{"projects":{"used":3}}"#, None),
        ]
    }

    #[test]
    fn reads_the_servers_events_and_counts_heartbeats() {
        let (events, parser) = parse_chunks(&[SERVER.as_bytes()]);
        assert_eq!(events, server_events());
        assert_eq!(parser.comments(), 1);
        assert_eq!(parser.last_event_id(), Some("7"));
    }

    #[test]
    fn any_split_into_two_chunks_gives_the_same_events() {
        let bytes = SERVER.as_bytes();
        for cut in 0..=bytes.len() {
            let (events, _) = parse_chunks(&[&bytes[..cut], &bytes[cut..]]);
            assert_eq!(events, server_events(), "split at byte {cut}");
        }
    }

    #[test]
    fn one_byte_at_a_time_gives_the_same_events() {
        let chunks: Vec<&[u8]> = SERVER.as_bytes().chunks(1).collect();
        assert_eq!(parse_chunks(&chunks).0, server_events());
    }

    #[test]
    fn crlf_and_lone_cr_end_lines_too() {
        let crlf = SERVER.replace('\n', "\r\n");
        assert_eq!(parse(&crlf), server_events());
        let cr = SERVER.replace('\n', "\r");
        assert_eq!(parse(&cr), server_events());
        // A CRLF split between chunks is one line end, not a blank line: the
        // event is not dispatched early, and its data stays whole.
        let (events, _) = parse_chunks(&[b"event: prompt\r", b"\ndata: a\r", b"\ndata: b\r\n\r\n"]);
        assert_eq!(events, vec![event("prompt", "a\nb", None)]);
    }

    #[test]
    fn an_event_is_only_dispatched_by_a_blank_line() {
        let (events, _) = parse_chunks(&[b"event: prompt\ndata: x\n"]);
        assert!(events.is_empty(), "{events:?}");
        let (events, _) = parse_chunks(&[b"event: prompt\ndata: x\n", b"\n"]);
        assert_eq!(events, vec![event("prompt", "x", None)]);
    }

    #[test]
    fn data_lines_join_with_newlines_and_keep_extra_spaces() {
        assert_eq!(
            parse("data: one\ndata:two\ndata:   three\ndata\n\n"),
            vec![event("message", "one\ntwo\n  three\n", None)]
        );
    }

    #[test]
    fn without_data_nothing_is_dispatched_and_the_type_does_not_leak() {
        // `event: prompt` with no data is dropped (as a browser does), and
        // its type does not carry over to the next event.
        assert_eq!(
            parse("event: prompt\n\ndata: later\n\n"),
            vec![event("message", "later", None)]
        );
        // An empty `data:` line still makes an event, with empty data.
        assert_eq!(
            parse("event: flags\ndata:\n\n"),
            vec![event("flags", "", None)]
        );
    }

    #[test]
    fn comments_unknown_fields_and_colonless_lines_are_handled() {
        let (events, parser) = parse_chunks(&[
            b": ping\n:\nfoo: bar\nevent\ndata: x\n\n: another\n\nevent: prompt\ndata: y\n\n",
        ]);
        // `event` alone sets an empty type, which reads as `message`.
        assert_eq!(
            events,
            vec![event("message", "x", None), event("prompt", "y", None)]
        );
        assert_eq!(parser.comments(), 3);
    }

    #[test]
    fn ids_persist_as_the_last_event_id_but_belong_to_their_own_event() {
        let (events, parser) = parse_chunks(&[
            b"id: 1\nevent: prompt\ndata: a\n\nevent: flags\ndata: b\n\nid: 2\0x\ndata: c\n\n",
        ]);
        assert_eq!(
            events,
            vec![
                event("prompt", "a", Some("1")),
                event("flags", "b", None),
                // An id with a NUL is ignored.
                event("message", "c", None),
            ]
        );
        assert_eq!(parser.last_event_id(), Some("1"));
    }

    #[test]
    fn retry_takes_only_digits() {
        let (_, parser) = parse_chunks(&[b"retry: 1500\n\n"]);
        assert_eq!(parser.retry_ms(), Some(1500));
        let (_, parser) = parse_chunks(&[b"retry: 1500\nretry: soon\n\n"]);
        assert_eq!(parser.retry_ms(), Some(1500));
    }

    #[test]
    fn a_leading_bom_is_skipped_even_when_split() {
        let mut bytes = BOM.to_vec();
        bytes.extend_from_slice(b"event: flags\ndata: {}\n\n");
        assert_eq!(parse_chunks(&[&bytes]).0, vec![event("flags", "{}", None)]);
        assert_eq!(
            parse_chunks(&[&bytes[..2], &bytes[2..]]).0,
            vec![event("flags", "{}", None)]
        );
        // Only at the start of the stream.
        let (events, _) = parse_chunks(&[b"data: a\n\n\xEF\xBB\xBFevent: x\ndata: b\n\n"]);
        assert_eq!(
            events,
            vec![event("message", "a", None), event("message", "b", None)]
        );
    }
}
