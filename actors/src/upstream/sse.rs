//! An incremental parser for `text/event-stream`, as upstreams send it.
//!
//! Follows the WHATWG rules that matter here: lines end in LF, CRLF or a lone CR; `data:` lines
//! accumulate (joined with LF) until a blank line dispatches the event; lines starting with `:`
//! are comments; one space after the colon is dropped; an event with no data is not dispatched.

use bytes::{Buf, Bytes, BytesMut};

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` name, if any (OpenAI and vLLM send none; Anthropic names every event).
    pub event: Option<String>,
    pub data: Bytes,
}

/// Feed bytes in as they arrive; take events out as they complete.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: BytesMut,
    data: BytesMut,
    has_data: bool,
    event: Option<String>,
    /// The previous chunk ended in CR: a leading LF in the next one belongs to that line end.
    skip_lf: bool,
}

/// Longest line we buffer; an upstream that exceeds it is broken or hostile.
pub const MAX_LINE: usize = 8 * 1024 * 1024;
/// Largest event we assemble (its `data:` lines together): the same bound, so that many short
/// lines cannot build what one long line may not.
pub const MAX_EVENT: usize = MAX_LINE;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TooLarge {
    #[error("an SSE line exceeded {MAX_LINE} bytes")]
    Line,
    #[error("an SSE event's data exceeded {MAX_EVENT} bytes")]
    Event,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete event, if the buffered bytes hold one.
    pub fn next_event(&mut self) -> Result<Option<SseEvent>, TooLarge> {
        loop {
            if self.skip_lf && !self.buf.is_empty() {
                if self.buf[0] == b'\n' {
                    self.buf.advance(1);
                }
                self.skip_lf = false;
            }
            let Some(end) = memchr::memchr2(b'\n', b'\r', &self.buf) else {
                if self.buf.len() > MAX_LINE {
                    return Err(TooLarge::Line);
                }
                return Ok(None);
            };
            let line = self.buf.split_to(end).freeze();
            let terminator = self.buf[0];
            self.buf.advance(1);
            if terminator == b'\r' {
                if self.buf.is_empty() {
                    self.skip_lf = true;
                } else if self.buf[0] == b'\n' {
                    self.buf.advance(1);
                }
            }
            if line.is_empty() {
                if let Some(ev) = self.dispatch() {
                    return Ok(Some(ev));
                }
                continue;
            }
            self.field(line)?;
        }
    }

    fn field(&mut self, line: Bytes) -> Result<(), TooLarge> {
        if line[0] == b':' {
            return Ok(());
        }
        let (name, value) = match memchr::memchr(b':', &line) {
            Some(i) => {
                let mut v = line.slice(i + 1..);
                if v.first() == Some(&b' ') {
                    v.advance(1);
                }
                (line.slice(..i), v)
            }
            None => (line.clone(), Bytes::new()),
        };
        match &name[..] {
            b"data" => {
                if self.data.len() + 1 + value.len() > MAX_EVENT {
                    return Err(TooLarge::Event);
                }
                if self.has_data {
                    self.data.extend_from_slice(b"\n");
                }
                self.data.extend_from_slice(&value);
                self.has_data = true;
            }
            b"event" => self.event = Some(String::from_utf8_lossy(&value).into_owned()),
            _ => {} // id, retry and unknown fields do not matter to a relay.
        }
        Ok(())
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        let event = self.event.take();
        if !self.has_data {
            return None;
        }
        self.has_data = false;
        Some(SseEvent {
            event,
            data: self.data.split().freeze(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in_pieces(input: &[u8], piece: usize) -> Vec<SseEvent> {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        for chunk in input.chunks(piece) {
            p.push(chunk);
            while let Some(ev) = p.next_event().expect("line ok") {
                out.push(ev);
            }
        }
        out
    }

    #[test]
    fn events_survive_any_split_and_any_line_ending() {
        let wire = b": keep-alive\n\ndata: {\"a\":1}\n\nevent: message_start\ndata: x\r\ndata: y\r\n\r\ndata:z\r\rdata: [DONE]\n\n";
        let expected = vec![
            SseEvent {
                event: None,
                data: Bytes::from_static(b"{\"a\":1}"),
            },
            SseEvent {
                event: Some("message_start".into()),
                data: Bytes::from_static(b"x\ny"),
            },
            SseEvent {
                event: None,
                data: Bytes::from_static(b"z"),
            },
            SseEvent {
                event: None,
                data: Bytes::from_static(b"[DONE]"),
            },
        ];
        for piece in 1..wire.len() {
            assert_eq!(parse_in_pieces(wire, piece), expected, "piece size {piece}");
        }
    }

    /// Neither one long line nor many short `data:` lines build an event past the bound.
    #[test]
    fn lines_and_events_are_bounded() {
        let mut p = SseParser::new();
        p.push(&vec![b'x'; MAX_LINE + 1]);
        assert_eq!(p.next_event(), Err(TooLarge::Line));
        let mut p = SseParser::new();
        let line = format!("data: {}\n", "y".repeat(1 << 20));
        let mut result = Ok(None);
        for _ in 0..9 {
            p.push(line.as_bytes());
            result = p.next_event();
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(TooLarge::Event));
    }

    #[test]
    fn an_unterminated_event_is_not_dispatched() {
        assert!(parse_in_pieces(b"data: partial\n", 4).is_empty());
    }
}
