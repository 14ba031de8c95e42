//! The QAPI-like type system of the commands Kestrel implements: argument checking with QEMU's messages (the
//! semantics of QEMU's `qobject-input-visitor.c`) and the `query-qmp-schema` introspection output.

use serde_json::{json, Map, Value};

use crate::json::qdict_order;

/// A QAPI type.
#[derive(Debug)]
pub enum Type {
    Str,
    Int,
    Bool,
    Number,
    Null,
    /// Any JSON value.
    Any,
    Enum(&'static [&'static str]),
    Array(&'static Type),
    Object(&'static ObjectType),
}

/// One member of an object type.
#[derive(Debug)]
pub struct Member {
    pub name: &'static str,
    pub ty: &'static Type,
    pub optional: bool,
}

/// A struct type. `tag` makes it a flat union whose every case adds no members (QEMU's `CpuInfoFast` as Kestrel
/// fills it: the tag is the `target` member).
#[derive(Debug)]
pub struct ObjectType {
    pub members: &'static [Member],
    pub tag: Option<&'static str>,
}

pub const fn req(name: &'static str, ty: &'static Type) -> Member {
    Member { name, ty, optional: false }
}

pub const fn opt(name: &'static str, ty: &'static Type) -> Member {
    Member { name, ty, optional: true }
}

fn type_error(path: &str, expected: &str) -> String {
    format!("Invalid parameter type for '{path}', expected: {expected}")
}

/// Checks the `arguments` of a command as QEMU's generated unmarshaller does: members in declaration order (missing
/// or wrong type), then the first unexpected key. Returns QEMU's message for the first problem.
pub fn check_arguments(args: &Map<String, Value>, ty: &ObjectType) -> Result<(), String> {
    check_members(args, ty, "")
}

fn check_members(map: &Map<String, Value>, ty: &ObjectType, prefix: &str) -> Result<(), String> {
    for m in ty.members {
        let path = format!("{prefix}{}", m.name);
        match map.get(m.name) {
            None if m.optional => {}
            None => return Err(format!("Parameter '{path}' is missing")),
            Some(v) => check_value(v, m.ty, Some(m.name), &path)?,
        }
    }
    let known = |k: &str| ty.members.iter().any(|m| m.name == k);
    if let Some(k) = ghash_order(map).into_iter().find(|k| !known(k)) {
        return Err(format!("Parameter '{prefix}{k}' is unexpected"));
    }
    Ok(())
}

/// Checks any value against a type (used by the tests to hold every command's return value to its declared type).
pub fn check_value_type(v: &Value, ty: &Type) -> Result<(), String> {
    check_value(v, ty, None, "<anonymous>")
}

fn check_value(v: &Value, ty: &Type, name: Option<&str>, path: &str) -> Result<(), String> {
    let ok = match ty {
        Type::Any => true,
        Type::Str => v.is_string(),
        Type::Int => v.as_i64().is_some(),
        Type::Bool => v.is_boolean(),
        Type::Number => v.is_number(),
        Type::Null => v.is_null(),
        Type::Enum(values) => {
            let Some(s) = v.as_str() else { return Err(type_error(path, "string")) };
            if values.contains(&s) {
                return Ok(());
            }
            // QEMU names the parameter by its bare name here, and a list element has none: 'null'.
            return Err(format!("Parameter '{}' does not accept value '{s}'", name.unwrap_or("null")));
        }
        Type::Array(elem) => {
            let Some(list) = v.as_array() else { return Err(type_error(path, "array")) };
            for (i, e) in list.iter().enumerate() {
                check_value(e, elem, None, &format!("{path}[{i}]"))?;
            }
            return Ok(());
        }
        Type::Object(obj) => {
            let Some(map) = v.as_object() else { return Err(type_error(path, "object")) };
            return check_members(map, obj, &format!("{path}."));
        }
    };
    if ok {
        return Ok(());
    }
    let expected = match ty {
        Type::Str => "string",
        Type::Int => "integer",
        Type::Bool => "boolean",
        Type::Number => "number",
        _ => "null",
    };
    Err(type_error(path, expected))
}

/// The order in which QEMU's input visitor finds leftover keys: it copies the object's keys (in QDict order) into a
/// GLib hash table and iterates that. For up to 7 keys the table has 8 slots and never resizes, and this is exact
/// (glib's `g_str_hash`, index `(hash * 11) % 7`, quadratic probing). Beyond that we keep QDict order, which only
/// matters when a request has more than one unexpected key among 8 or more.
fn ghash_order(map: &Map<String, Value>) -> Vec<&str> {
    let keys: Vec<&str> = qdict_order(map).into_iter().map(|(k, _)| k.as_str()).collect();
    if keys.len() > 7 {
        return keys;
    }
    let mut slots: [Option<&str>; 8] = [None; 8];
    for k in &keys {
        // g_str_hash hashes signed chars.
        let mut h: u32 = 5381;
        for &b in k.as_bytes() {
            h = (h << 5).wrapping_add(h).wrapping_add(b as i8 as i32 as u32);
        }
        let h = if h < 2 { 2 } else { h };
        let mut idx = (h.wrapping_mul(11) % 7) as usize;
        let mut step = 0;
        while slots[idx].is_some() {
            step += 1;
            idx = (idx + step) & 7;
        }
        slots[idx] = Some(k);
    }
    slots.into_iter().flatten().collect()
}

/// Builds `query-qmp-schema`'s answer from the command and event tables: entities first, then every type they use,
/// named as QEMU names them (builtins by name, other types by number in order of first use, arrays `[elem]`).
pub struct SchemaBuilder {
    /// Types already named, by address (every schema type is a `static`).
    names: Vec<(*const (), String)>,
    pending: Vec<(&'static Type, String)>,
    out: Vec<Value>,
    next: usize,
}

impl SchemaBuilder {
    pub fn new() -> Self {
        SchemaBuilder { names: Vec::new(), pending: Vec::new(), out: Vec::new(), next: 0 }
    }

    fn builtin(ty: &Type) -> Option<(&'static str, &'static str)> {
        Some(match ty {
            Type::Str => ("str", "string"),
            Type::Int => ("int", "int"),
            Type::Bool => ("bool", "boolean"),
            Type::Number => ("number", "number"),
            Type::Null => ("null", "null"),
            Type::Any => ("any", "value"),
            _ => return None,
        })
    }

    /// Name of a type, assigning one (and queueing its definition) on first use.
    pub fn name(&mut self, ty: &'static Type) -> String {
        let key = match ty {
            Type::Enum(v) => v.as_ptr() as *const (),
            Type::Object(o) => *o as *const ObjectType as *const (),
            _ => ty as *const Type as *const (),
        };
        let name = match ty {
            Type::Array(elem) => format!("[{}]", self.name(elem)),
            _ => match Self::builtin(ty) {
                Some((n, _)) => n.to_string(),
                None => {
                    if let Some((_, n)) = self.names.iter().find(|(k, _)| *k == key) {
                        return n.clone();
                    }
                    let n = self.next.to_string();
                    self.next += 1;
                    n
                }
            },
        };
        if !self.names.iter().any(|(_, n)| *n == name) {
            self.names.push((key, name.clone()));
            self.pending.push((ty, name.clone()));
        }
        name
    }

    pub fn command(&mut self, name: &str, args: &'static Type, ret: &'static Type) {
        let arg_type = self.name(args);
        let ret_type = self.name(ret);
        self.out.push(json!({"name": name, "meta-type": "command", "arg-type": arg_type, "ret-type": ret_type}));
    }

    pub fn event(&mut self, name: &str, data: &'static Type) {
        let arg_type = self.name(data);
        self.out.push(json!({"name": name, "meta-type": "event", "arg-type": arg_type}));
    }

    pub fn finish(mut self) -> Value {
        let mut i = 0;
        while i < self.pending.len() {
            let (ty, name) = self.pending[i].clone();
            let v = match ty {
                Type::Array(elem) => {
                    let e = self.name(elem);
                    json!({"name": name, "meta-type": "array", "element-type": e})
                }
                Type::Enum(values) => {
                    let members: Vec<Value> = values.iter().map(|v| json!({"name": v})).collect();
                    json!({"name": name, "meta-type": "enum", "members": members, "values": values})
                }
                Type::Object(obj) => {
                    let mut members = Vec::new();
                    let mut tag_enum = None;
                    for m in obj.members {
                        let t = self.name(m.ty);
                        if Some(m.name) == obj.tag {
                            tag_enum = Some(m.ty);
                        }
                        members.push(if m.optional {
                            json!({"name": m.name, "default": null, "type": t})
                        } else {
                            json!({"name": m.name, "type": t})
                        });
                    }
                    let mut v = json!({"name": name, "meta-type": "object", "members": members});
                    if let (Some(tag), Some(Type::Enum(cases))) = (obj.tag, tag_enum) {
                        let empty = self.name(&crate::commands::T_EMPTY);
                        let variants: Vec<Value> = cases.iter().map(|c| json!({"case": c, "type": empty})).collect();
                        v["tag"] = json!(tag);
                        v["variants"] = json!(variants);
                    }
                    v
                }
                _ => {
                    let (_, json_type) = Self::builtin(ty).expect("builtin");
                    json!({"name": name, "meta-type": "builtin", "json-type": json_type})
                }
            };
            self.out.push(v);
            i += 1;
        }
        Value::Array(self.out)
    }
}

impl Default for SchemaBuilder {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static S: Type = Type::Str;
    static I: Type = Type::Int;
    static E: Type = Type::Enum(&["oob"]);
    static LE: Type = Type::Array(&E);
    static INNER: ObjectType = ObjectType { members: &[req("x", &I)], tag: None };
    static TI: Type = Type::Object(&INNER);
    static ARGS: ObjectType =
        ObjectType { members: &[req("s", &S), opt("n", &I), opt("e", &LE), opt("o", &TI)], tag: None };

    fn check(v: Value) -> Result<(), String> {
        check_arguments(v.as_object().unwrap(), &ARGS)
    }

    #[test]
    fn argument_messages_match_qemu() {
        assert_eq!(check(json!({"s": "a"})), Ok(()));
        assert_eq!(check(json!({})), Err("Parameter 's' is missing".into()));
        assert_eq!(check(json!({"s": 1})), Err("Invalid parameter type for 's', expected: string".into()));
        assert_eq!(check(json!({"s": "a", "n": 1.5})), Err("Invalid parameter type for 'n', expected: integer".into()));
        assert_eq!(
            check(json!({"s": "a", "n": 18446744073709551615u64})),
            Err("Invalid parameter type for 'n', expected: integer".into())
        );
        assert_eq!(check(json!({"s": "a", "e": "oob"})), Err("Invalid parameter type for 'e', expected: array".into()));
        assert_eq!(
            check(json!({"s": "a", "e": [1]})),
            Err("Invalid parameter type for 'e[0]', expected: string".into())
        );
        assert_eq!(
            check(json!({"s": "a", "e": ["oob", "x"]})),
            Err("Parameter 'null' does not accept value 'x'".into())
        );
        assert_eq!(check(json!({"s": "a", "o": {}})), Err("Parameter 'o.x' is missing".into()));
        assert_eq!(check(json!({"s": "a", "o": {"x": 1, "y": 2}})), Err("Parameter 'o.y' is unexpected".into()));
        assert_eq!(check(json!({"s": "a", "o": 1})), Err("Invalid parameter type for 'o', expected: object".into()));
        // Missing/wrong members are reported before unexpected ones; among unexpected keys, glib's order.
        assert_eq!(check(json!({"zz": 1})), Err("Parameter 's' is missing".into()));
        assert_eq!(check(json!({"s": "a", "a": 1, "b": 2})), Err("Parameter 'b' is unexpected".into()));
    }
}
