//! JSON Schema constrained answers (`response_format: json_schema`, strict tools): a schema is
//! compiled to a small grammar, and [`SchemaValidator`] checks bytes against it incrementally.
//!
//! Every text the validator accepts conforms to the schema. It generates a subset of the
//! conforming texts: an object's declared properties in the schema's order (optional ones may
//! be left out) and no undeclared ones. Supported: `type` (one or a list), `properties`,
//! `required`, `additionalProperties` (false, or true without `properties`: any keys),
//! `items`, `minItems`, `maxItems`, `enum`, `const`, `anyOf`/`oneOf` whose branches start
//! differently (an object or null, a string or a number: what optional fields and simple
//! unions compile to), `$ref` into the document (`$defs`, `definitions`, recursion included);
//! annotations (`title`, `description`, `default`, `examples`, `$schema`, `$id`, `$comment`)
//! are ignored. Any other keyword (such as `pattern`, `minimum`, `allOf`) is refused with its
//! path, never ignored.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

use super::json::{is_ws, string_byte, Num, StrByte, WsRun};

const NULL: u8 = 1;
const BOOLEAN: u8 = 2;
const INTEGER: u8 = 4;
const NUMBER: u8 = 8;
const STRING: u8 = 16;
const OBJECT: u8 = 32;
const ARRAY: u8 = 64;
const ANY: u8 = 127;

const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
];

#[derive(Debug, Clone)]
struct Prop {
    /// The key as JSON text, quotes included.
    key: Vec<u8>,
    node: usize,
    required: bool,
}

#[derive(Debug, Clone)]
enum Node {
    Typed {
        types: u8,
        /// Declared properties in order; None: any keys (values of any type).
        props: Option<Vec<Prop>>,
        items: usize,
        min_items: usize,
        max_items: Option<usize>,
    },
    /// One of these values, as compact JSON text.
    Enum(Arc<[Vec<u8>]>),
    /// One of these nodes, told apart by the value's first byte.
    AnyOf(Vec<usize>),
    /// A slot reserved for a `$ref` target while it compiles.
    Pending,
}

/// Node 0: any JSON value (free-form objects' values, arrays without `items`).
const ANY_NODE: usize = 0;

/// A compiled schema: nodes in an arena.
#[derive(Debug)]
pub struct Schema {
    nodes: Vec<Node>,
    root: usize,
    /// Per node, the kinds of byte its values can start with (a `types`-like mask, INTEGER
    /// folded into NUMBER): how `AnyOf` picks a branch.
    starts: Vec<u8>,
}

/// What compiling needs beside the nodes: the whole document (for `$ref`) and the targets
/// already compiled or being compiled.
struct Compiler<'a> {
    schema: Schema,
    document: &'a Value,
    refs: HashMap<String, usize>,
    /// AnyOf nodes and where they are, checked once every node is known.
    unions: Vec<(usize, String)>,
}

/// The kind of the first byte of a JSON value (0: none).
fn start_kind(b: u8) -> u8 {
    match b {
        b'"' => STRING,
        b'-' | b'0'..=b'9' => NUMBER,
        b't' | b'f' => BOOLEAN,
        b'n' => NULL,
        b'{' => OBJECT,
        b'[' => ARRAY,
        _ => 0,
    }
}

impl Schema {
    /// Compiles `schema`; the root must describe an object. Errors name the unsupported
    /// keyword or value and where it is (a JSON pointer).
    pub fn compile(schema: &Value) -> Result<Arc<Schema>, String> {
        let mut c = Compiler {
            schema: Schema {
                nodes: vec![Node::Typed {
                    types: ANY,
                    props: None,
                    items: ANY_NODE,
                    min_items: 0,
                    max_items: None,
                }],
                root: ANY_NODE,
                starts: Vec::new(),
            },
            document: schema,
            refs: HashMap::new(),
            unions: Vec::new(),
        };
        let root = c.reference("#", "")?;
        let mut s = c.finish()?;
        s.root = root;
        match &s.nodes[root] {
            Node::Typed { types, .. } if *types == OBJECT => Ok(Arc::new(s)),
            _ => Err("the schema's root must be an object (\"type\": \"object\")".into()),
        }
    }
}

impl Compiler<'_> {
    /// The node of the `$ref` target `r` (a JSON pointer into the document), compiling it on
    /// first use; a reference met while its target compiles points at the reserved slot.
    fn reference(&mut self, r: &str, path: &str) -> Result<usize, String> {
        if let Some(&i) = self.refs.get(r) {
            return Ok(i);
        }
        let Some(pointer) = r.strip_prefix('#') else {
            return Err(format!(
                "{}: only references into this schema (`#...`) are supported, got `{r}`",
                at(path)
            ));
        };
        let target = self
            .document
            .pointer(pointer)
            .ok_or_else(|| format!("{}: `$ref` `{r}` points at nothing", at(path)))?;
        let slot = self.schema.nodes.len();
        self.schema.nodes.push(Node::Pending);
        self.refs.insert(r.to_string(), slot);
        let built = self.node(target, pointer)?;
        let shared = built == ANY_NODE || self.refs.values().any(|&v| v == built);
        if shared {
            // An existing node (`true`, another reference's target): the slot becomes a copy
            // (children are indices, so the copy is the same grammar).
            self.schema.nodes[slot] = self.schema.nodes[built].clone();
        } else if built != slot {
            // Move the new node into the reserved slot (only this call knew `built`).
            self.schema.nodes.swap(slot, built);
            if let Some(u) = self.unions.iter_mut().find(|(i, _)| *i == built) {
                u.0 = slot;
            }
        }
        Ok(slot)
    }

    /// Computes every node's start kinds and checks that each `anyOf` can pick its branch
    /// from the first byte.
    fn finish(mut self) -> Result<Schema, String> {
        let n = self.schema.nodes.len();
        let mut starts = vec![0u8; n];
        // Iterate to a fixed point: unions may refer to each other through `$ref`.
        loop {
            let mut changed = false;
            for i in 0..n {
                let k = match &self.schema.nodes[i] {
                    Node::Typed { types, .. } => {
                        let t = *types;
                        if t & INTEGER != 0 {
                            (t & !INTEGER) | NUMBER
                        } else {
                            t
                        }
                    }
                    Node::Enum(options) => options
                        .iter()
                        .map(|o| o.first().map_or(0, |&b| start_kind(b)))
                        .fold(0, |a, k| a | k),
                    Node::AnyOf(branches) => branches.iter().fold(0, |a, &b| a | starts[b]),
                    Node::Pending => 0,
                };
                if k != starts[i] {
                    starts[i] = k;
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        for (i, path) in &self.unions {
            if let Node::AnyOf(branches) = &self.schema.nodes[*i] {
                let mut seen = 0u8;
                for (j, &b) in branches.iter().enumerate() {
                    if starts[b] & seen != 0 {
                        return Err(format!(
                            "{}: branch {j} of `anyOf`/`oneOf` can start like an earlier one (same \
                             type); only branches of different types are supported",
                            at(path)
                        ));
                    }
                    seen |= starts[b];
                }
            }
        }
        self.schema.starts = starts;
        Ok(self.schema)
    }

    fn node(&mut self, v: &Value, path: &str) -> Result<usize, String> {
        let obj = match v {
            Value::Bool(true) => return Ok(ANY_NODE),
            Value::Object(o) => o,
            other => {
                return Err(format!(
                    "{}: a schema must be an object, got {other}",
                    at(path)
                ))
            }
        };
        for key in obj.keys() {
            let known = matches!(
                key.as_str(),
                "type"
                    | "properties"
                    | "required"
                    | "additionalProperties"
                    | "items"
                    | "minItems"
                    | "maxItems"
                    | "enum"
                    | "const"
                    | "anyOf"
                    | "oneOf"
                    | "$ref"
                    | "$defs"
                    | "definitions"
            ) || ANNOTATIONS.contains(&key.as_str());
            if !known {
                return Err(format!(
                    "{}: the JSON schema keyword `{key}` is not supported",
                    at(path)
                ));
            }
        }
        if let Some(r) = obj.get("$ref") {
            let r = r
                .as_str()
                .ok_or_else(|| format!("{}: `$ref` must be a string", at(path)))?;
            return self.reference(r, path);
        }
        if let Some(branches) = obj.get("anyOf").or(obj.get("oneOf")) {
            let Value::Array(branches) = branches else {
                return Err(format!("{}: `anyOf`/`oneOf` must be an array", at(path)));
            };
            let kw = if obj.contains_key("anyOf") {
                "anyOf"
            } else {
                "oneOf"
            };
            let nodes = branches
                .iter()
                .enumerate()
                .map(|(i, b)| self.node(b, &format!("{path}/{kw}/{i}")))
                .collect::<Result<Vec<_>, _>>()?;
            if nodes.is_empty() {
                return Err(format!("{}: `{kw}` must not be empty", at(path)));
            }
            self.schema.nodes.push(Node::AnyOf(nodes));
            let i = self.schema.nodes.len() - 1;
            self.unions.push((i, path.to_string()));
            return Ok(i);
        }
        if let Some(values) = obj.get("enum").or(obj.get("const")) {
            let values = match (obj.contains_key("enum"), values) {
                (true, Value::Array(a)) if !a.is_empty() => a.clone(),
                (true, _) => return Err(format!("{}: `enum` must be a non-empty array", at(path))),
                (false, v) => vec![v.clone()],
            };
            let texts = values
                .iter()
                .map(|v| serde_json::to_vec(v).map_err(|e| format!("{}: {e}", at(path))))
                .collect::<Result<Vec<_>, _>>()?;
            self.schema.nodes.push(Node::Enum(texts.into()));
            return Ok(self.schema.nodes.len() - 1);
        }
        let types = match obj.get("type") {
            None => ANY,
            Some(Value::String(t)) => type_bit(t, path)?,
            Some(Value::Array(ts)) => ts.iter().try_fold(0, |acc, t| match t {
                Value::String(t) => Ok(acc | type_bit(t, path)?),
                other => Err(format!("{}: bad type {other}", at(path))),
            })?,
            Some(other) => return Err(format!("{}: bad type {other}", at(path))),
        };
        let props = match (obj.get("properties"), obj.get("additionalProperties")) {
            (Some(Value::Object(p)), None | Some(Value::Bool(false))) => {
                let required: Vec<&str> = match obj.get("required") {
                    None => Vec::new(),
                    Some(Value::Array(r)) => r.iter().filter_map(Value::as_str).collect(),
                    Some(other) => return Err(format!("{}: bad `required` {other}", at(path))),
                };
                if let Some(missing) = required.iter().find(|r| !p.contains_key(**r)) {
                    return Err(format!(
                        "{}: `required` names `{missing}`, which is not in `properties`",
                        at(path)
                    ));
                }
                let mut out = Vec::with_capacity(p.len());
                for (k, sub) in p {
                    let node = self.node(sub, &format!("{path}/properties/{k}"))?;
                    out.push(Prop {
                        key: serde_json::to_vec(k).map_err(|e| e.to_string())?,
                        node,
                        required: required.contains(&k.as_str()),
                    });
                }
                Some(out)
            }
            (Some(Value::Object(_)), Some(_)) => {
                return Err(format!(
                    "{}: `additionalProperties` beside `properties` must be false",
                    at(path)
                ))
            }
            (Some(other), _) => return Err(format!("{}: bad `properties` {other}", at(path))),
            (None, None | Some(Value::Bool(true))) => None,
            (None, Some(_)) => {
                return Err(format!(
                    "{}: `additionalProperties` without `properties` must be true or absent",
                    at(path)
                ))
            }
        };
        if props.is_some() && types & OBJECT == 0 {
            return Err(format!("{}: `properties` on a non-object type", at(path)));
        }
        let items = match obj.get("items") {
            None => ANY_NODE,
            Some(sub) => self.node(sub, &format!("{path}/items"))?,
        };
        let count = |k: &str| -> Result<Option<usize>, String> {
            match obj.get(k) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| format!("{}: `{k}` must be a non-negative integer", at(path))),
            }
        };
        let (min_items, max_items) = (count("minItems")?.unwrap_or(0), count("maxItems")?);
        if max_items.is_some_and(|m| m < min_items) {
            return Err(format!("{}: maxItems < minItems", at(path)));
        }
        self.schema.nodes.push(Node::Typed {
            types,
            props,
            items,
            min_items,
            max_items,
        });
        Ok(self.schema.nodes.len() - 1)
    }
}

fn at(path: &str) -> String {
    if path.is_empty() {
        "schema".into()
    } else {
        format!("schema at {path}")
    }
}

fn type_bit(t: &str, path: &str) -> Result<u8, String> {
    Ok(match t {
        "null" => NULL,
        "boolean" => BOOLEAN,
        "integer" => INTEGER,
        "number" => NUMBER,
        "string" => STRING,
        "object" => OBJECT,
        "array" => ARRAY,
        other => return Err(format!("{}: unknown type `{other}`", at(path))),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ObjPhase {
    /// After `{`: a key or `}`.
    Open,
    /// After a key: `:`.
    Colon,
    /// After a value: `,` or `}`.
    After,
    /// After `,`: a key.
    Key,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArrPhase {
    Open,
    After,
    Item,
}

#[derive(Debug, Clone)]
enum Frame {
    /// A value of this node is expected.
    Value(usize),
    Str {
        esc: u8,
        key: bool,
    },
    Num {
        num: Num,
        integer: bool,
    },
    Lit(&'static [u8]),
    /// One of these JSON texts (enum values, declared keys), `matched` bytes in.
    OneOf {
        options: Arc<[Vec<u8>]>,
        matched: Vec<u8>,
        /// For keys: the property index of each option.
        props: Option<Vec<usize>>,
    },
    Object {
        node: usize,
        phase: ObjPhase,
        /// Declared properties from this index on may still come.
        next: usize,
        /// The node of the value after the current key.
        value: usize,
    },
    Array {
        node: usize,
        phase: ArrPhase,
        count: usize,
    },
}

/// Incremental validation of one JSON text against a [`Schema`].
#[derive(Debug, Clone)]
pub struct SchemaValidator {
    schema: Arc<Schema>,
    stack: Vec<Frame>,
    done: bool,
    ws: WsRun,
}

impl SchemaValidator {
    pub fn new(schema: Arc<Schema>) -> Self {
        SchemaValidator {
            stack: vec![Frame::Value(schema.root)],
            schema,
            done: false,
            ws: WsRun::default(),
        }
    }

    /// The value is complete.
    pub fn complete(&self) -> bool {
        self.done
    }

    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| self.byte(b))
    }

    fn pop_value(&mut self) {
        self.stack.pop();
        self.done = self.stack.is_empty();
    }

    /// The declared properties that may come next in `node` from `next` on: the optional ones
    /// up to and including the first required one.
    fn next_keys(&self, node: usize, next: usize) -> Option<Vec<usize>> {
        let Node::Typed {
            props: Some(props), ..
        } = &self.schema.nodes[node]
        else {
            return None;
        };
        let mut out = Vec::new();
        for (i, p) in props.iter().enumerate().skip(next) {
            out.push(i);
            if p.required {
                break;
            }
        }
        Some(out)
    }

    /// Whether `node`'s object may close with properties from `next` on left out.
    fn may_close(&self, node: usize, next: usize) -> bool {
        match &self.schema.nodes[node] {
            Node::Typed {
                props: Some(props), ..
            } => props.iter().skip(next).all(|p| !p.required),
            _ => true,
        }
    }

    pub(super) fn byte(&mut self, b: u8) -> bool {
        let in_text = matches!(
            self.stack.last(),
            Some(Frame::Str { .. } | Frame::OneOf { .. })
        );
        self.ws.admit(b, !in_text) && self.step(b)
    }

    fn step(&mut self, b: u8) -> bool {
        let Some(top) = self.stack.last_mut() else {
            return is_ws(b);
        };
        match top {
            Frame::Value(node) => {
                if is_ws(b) {
                    return true;
                }
                let node = *node;
                self.start_value(node, b)
            }
            Frame::Str { esc, key } => match string_byte(esc, b) {
                StrByte::More => true,
                StrByte::Invalid => false,
                StrByte::Closed => {
                    let key = *key;
                    self.stack.pop();
                    if key {
                        if let Some(Frame::Object { phase, .. }) = self.stack.last_mut() {
                            *phase = ObjPhase::Colon;
                        }
                    } else {
                        self.done = self.stack.is_empty();
                    }
                    true
                }
            },
            Frame::Num { num, integer } => match num.next(b) {
                Some(n) if !*integer || n.integral() => {
                    *num = n;
                    true
                }
                _ if num.can_end() => {
                    self.pop_value();
                    self.step(b)
                }
                _ => false,
            },
            Frame::Lit(rest) => {
                if rest.first() != Some(&b) {
                    return false;
                }
                if rest.len() == 1 {
                    self.pop_value();
                } else {
                    *rest = &rest[1..];
                }
                true
            }
            Frame::OneOf {
                options,
                matched,
                props,
            } => {
                let (options, props) = (Arc::clone(options), props.clone());
                matched.push(b);
                let m = matched.clone();
                let chosen = |m: &[u8]| {
                    props
                        .as_ref()
                        .and_then(|p| options.iter().position(|o| o == m).map(|i| p[i]))
                };
                if options.iter().any(|o| o.starts_with(&m)) {
                    let longer = options
                        .iter()
                        .any(|o| o.len() > m.len() && o.starts_with(&m));
                    if options.contains(&m) && !longer {
                        // A whole option that no other one extends: done.
                        self.finish_one_of(chosen(&m));
                    }
                    return true;
                }
                // `m` minus `b` may have been a whole option that a longer one extended
                // (enum 1 beside 12): done, and `b` goes to what follows.
                let before = &m[..m.len() - 1];
                if !options.iter().any(|o| o.as_slice() == before) {
                    return false;
                }
                self.finish_one_of(chosen(before));
                self.step(b)
            }
            Frame::Object {
                node,
                phase,
                next,
                value,
            } => {
                if is_ws(b) {
                    return true;
                }
                let (node, cur_phase, cur_next, cur_value) = (*node, *phase, *next, *value);
                match (cur_phase, b) {
                    (ObjPhase::Open | ObjPhase::Key, b'"') => {
                        match self.next_keys(node, cur_next) {
                            None => {
                                self.stack.push(Frame::Str { esc: 0, key: true });
                                true
                            }
                            Some(keys) if keys.is_empty() => false,
                            Some(keys) => {
                                let Node::Typed {
                                    props: Some(props), ..
                                } = &self.schema.nodes[node]
                                else {
                                    return false;
                                };
                                let options: Arc<[Vec<u8>]> =
                                    keys.iter().map(|&i| props[i].key.clone()).collect();
                                self.stack.push(Frame::OneOf {
                                    options,
                                    matched: vec![b'"'],
                                    props: Some(keys),
                                });
                                true
                            }
                        }
                    }
                    (ObjPhase::Open | ObjPhase::After, b'}') if self.may_close(node, cur_next) => {
                        self.pop_value();
                        true
                    }
                    (ObjPhase::Colon, b':') => {
                        if let Some(Frame::Object { phase, .. }) = self.stack.last_mut() {
                            *phase = ObjPhase::After;
                        }
                        self.stack.push(Frame::Value(cur_value));
                        true
                    }
                    (ObjPhase::After, b',') => {
                        let more = self.next_keys(node, cur_next).is_none_or(|k| !k.is_empty());
                        if more {
                            if let Some(Frame::Object { phase, .. }) = self.stack.last_mut() {
                                *phase = ObjPhase::Key;
                            }
                        }
                        more
                    }
                    _ => false,
                }
            }
            Frame::Array { node, phase, count } => {
                if is_ws(b) {
                    return true;
                }
                let Node::Typed {
                    items,
                    min_items,
                    max_items,
                    ..
                } = self.schema.nodes[*node]
                else {
                    return false;
                };
                match (*phase, b) {
                    (ArrPhase::Open | ArrPhase::After, b']') if *count >= min_items => {
                        self.pop_value();
                        true
                    }
                    (ArrPhase::After, b',') if max_items.is_none_or(|m| *count < m) => {
                        *phase = ArrPhase::Item;
                        true
                    }
                    (ArrPhase::Open | ArrPhase::Item, _)
                        if max_items.is_none_or(|m| *count < m) =>
                    {
                        *phase = ArrPhase::After;
                        *count += 1;
                        self.stack.push(Frame::Value(items));
                        self.step(b)
                    }
                    _ => false,
                }
            }
        }
    }

    /// A one-of frame matched a whole option: a key (`chosen` property) or an enum value.
    fn finish_one_of(&mut self, chosen: Option<usize>) {
        self.stack.pop();
        match chosen {
            Some(i) => {
                if let Some(Frame::Object {
                    node,
                    phase,
                    next,
                    value,
                }) = self.stack.last_mut()
                {
                    if let Node::Typed {
                        props: Some(props), ..
                    } = &self.schema.nodes[*node]
                    {
                        *value = props[i].node;
                    }
                    *next = i + 1;
                    *phase = ObjPhase::Colon;
                }
            }
            None => self.done = self.stack.is_empty(),
        }
    }

    /// Replaces the `Value(node)` frame on top with the frame for a value starting with `b`.
    fn start_value(&mut self, node: usize, b: u8) -> bool {
        let frame = match &self.schema.nodes[node] {
            Node::Enum(options) => {
                let options = Arc::clone(options);
                self.stack.pop();
                self.stack.push(Frame::OneOf {
                    options,
                    matched: Vec::new(),
                    props: None,
                });
                return self.step(b);
            }
            Node::AnyOf(branches) => {
                let kind = start_kind(b);
                let Some(&branch) = branches
                    .iter()
                    .find(|&&br| self.schema.starts[br] & kind != 0)
                else {
                    return false;
                };
                return self.start_value(branch, b);
            }
            Node::Pending => return false,
            Node::Typed { types, .. } => {
                let t = *types;
                match b {
                    b'"' if t & STRING != 0 => Frame::Str { esc: 0, key: false },
                    b'-' | b'0'..=b'9' if t & (NUMBER | INTEGER) != 0 => Frame::Num {
                        num: match Num::start(b) {
                            Some(n) => n,
                            None => return false,
                        },
                        integer: t & NUMBER == 0,
                    },
                    b't' if t & BOOLEAN != 0 => Frame::Lit(b"rue"),
                    b'f' if t & BOOLEAN != 0 => Frame::Lit(b"alse"),
                    b'n' if t & NULL != 0 => Frame::Lit(b"ull"),
                    b'{' if t & OBJECT != 0 => Frame::Object {
                        node,
                        phase: ObjPhase::Open,
                        next: 0,
                        value: 0,
                    },
                    b'[' if t & ARRAY != 0 => Frame::Array {
                        node,
                        phase: ArrPhase::Open,
                        count: 0,
                    },
                    _ => return false,
                }
            }
        };
        self.stack.pop();
        self.stack.push(frame);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Arc<Schema> {
        Schema::compile(&json!({
            "type": "object",
            "title": "person",
            "properties": {
                "name": {"type": "string", "description": "full name"},
                "age": {"type": "integer"},
                "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
                "kind": {"enum": [1, 12, "x"]},
                "opt": {"type": ["number", "null"]},
                "home": {"type": "object", "properties": {"city": {"const": "Paris"}}, "required": ["city"]}
            },
            "required": ["name", "age", "tags", "kind"],
            "additionalProperties": false
        }))
        .unwrap()
    }

    /// Every prefix is accepted and the whole text completes the value.
    fn accepts(s: &Arc<Schema>, text: &str) -> bool {
        let mut v = SchemaValidator::new(Arc::clone(s));
        for (i, b) in text.bytes().enumerate() {
            assert!(!v.complete(), "complete before byte {i} of {text}");
            if !v.byte(b) {
                return false;
            }
        }
        v.complete()
    }

    #[test]
    fn accepts_conforming_values() {
        let s = schema();
        for ok in [
            r#"{"name": "Bo \"B\" \u00e9", "age": -3, "tags": ["a", "b"], "kind": 12, "opt": null}"#,
            r#"{"name":"x","age":0,"tags":[],"kind":1}"#,
            r#"{ "name" : "x" , "age" : 10 , "tags" : [ "b" ] , "kind" : "x" , "opt" : 2.5e-3 , "home" : {"city": "Paris"} }"#,
        ] {
            assert!(accepts(&s, ok), "{ok}");
            let v: Value = serde_json::from_str(ok).unwrap();
            assert!(v.is_object());
        }
        let free = Schema::compile(&json!({"type": "object"})).unwrap();
        assert!(accepts(
            &free,
            r#"{"a": [1, {"b": null}, true], "c": "d", "e": {}}"#
        ));
    }

    #[test]
    fn rejects_non_conforming_values() {
        let s = schema();
        for bad in [
            r#"{"name": "x", "age": 1.5"#,
            r#"{"name": "x", "age": 1e3"#,
            r#"{"name": "x", "age": 1, "tags": ["a", "b", "a"]"#,
            r#"{"name": "x", "age": 1, "tags": ["c"]"#,
            r#"{"name": "x", "tags""#,
            r#"{"age""#,
            r#"{"zzz""#,
            r#"{"name": "x", "age": 1, "tags": [], "kind": 2"#,
            r#"{"name": "x", "age": 1, "tags": [], "kind": 1, "opt": "s""#,
            r#"{"name": "x", "age": 1, "tags": [], "kind": 1, "home": {}"#,
            r#"{"name": "x", "age": 1, "tags": [], "kind": 1, "home": {"city": "Rome"#,
            r#"{"name": "x", "age": 1}"#,
            r#"{"name": "x", "age": 1, "tags": [], "kind": 1,}"#,
            r#"{"name": 5"#,
            "[",
        ] {
            assert!(!accepts(&s, bad), "{bad}");
        }
    }

    #[test]
    fn unions_and_references() {
        // What pydantic writes for `class Tree: name: str; kids: list[Tree]; note: str | None`.
        let s = Schema::compile(&json!({
            "$defs": {
                "Tree": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "kids": {"type": "array", "items": {"$ref": "#/$defs/Tree"}},
                        "note": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": null}
                    },
                    "required": ["name", "kids"]
                }
            },
            "$ref": "#/$defs/Tree"
        }))
        .unwrap();
        assert!(accepts(
            &s,
            r#"{"name": "a", "kids": [{"name": "b", "kids": [], "note": null}, {"name": "c", "kids": [], "note": "x"}]}"#
        ));
        assert!(!accepts(&s, r#"{"name": "a", "kids": [{"name": 1"#));
        assert!(!accepts(&s, r#"{"name": "a", "kids": [], "note": 5"#));
        let e = Schema::compile(&json!({"type": "object", "properties": {
            "a": {"anyOf": [{"type": "integer"}, {"type": "number"}]}}}))
        .unwrap_err();
        assert!(e.contains("/properties/a") && e.contains("branch 1"), "{e}");
        let e = Schema::compile(&json!({"$ref": "#/$defs/Missing"})).unwrap_err();
        assert!(e.contains("points at nothing"), "{e}");
    }

    #[test]
    fn refuses_what_it_cannot_enforce() {
        for (schema, what) in [
            (
                json!({"type": "object", "properties": {"a": {"type": "string", "pattern": "x"}}}),
                "`pattern`",
            ),
            (json!({"allOf": [{"type": "object"}]}), "`allOf`"),
            (json!({"type": "array"}), "root must be an object"),
            (
                json!({"type": "object", "required": ["a"], "properties": {}}),
                "`a`",
            ),
            (
                json!({"type": "object", "properties": {"a": {}}, "additionalProperties": true}),
                "must be false",
            ),
            (
                json!({"type": "object", "properties": {"a": {"type": "decimal"}}}),
                "unknown type",
            ),
        ] {
            let e = Schema::compile(&schema).unwrap_err();
            assert!(e.contains(what), "{e}");
        }
        let e = Schema::compile(&json!({"type": "object", "properties": {"a": {"minimum": 1}}}))
            .unwrap_err();
        assert!(e.contains("/properties/a"), "the path is named: {e}");
    }
}
