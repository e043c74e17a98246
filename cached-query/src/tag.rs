//! Tags as code: [`tags!`](crate::tags) declares tag functions once for both sides, and the
//! support that renders a placeholder's value (`Display`, or nothing for `None`).

use std::fmt::Display;

/// Declares functions that build tags, so that readers and writers name a tag through one
/// definition and a typo is a compile error:
///
/// ```
/// cached_query::tags! {
///     /// Everything read about one user.
///     pub fn user(id: i64) = "user:{id}";
///     pub fn membership(user: i64, org: i64) = "member:{user}:{org}";
/// }
///
/// assert_eq!(user(42), "user:42");
/// assert_eq!(membership(1, 2), "member:1:2");
/// ```
///
/// Each declaration becomes `fn name(args) -> String` rendering its format string with
/// `format!` (so `{id}` names an argument and `{{` is a literal brace). Use the functions as
/// tag elements, `#[cached_query(invalidate = [user(id)])]` and
/// `#[invalidates(user(id), cache = cache)]`, evaluated with the call's parameters, and with
/// [`Cache::invalidate`](crate::Cache::invalidate) / `invalidate_many`.
#[macro_export]
macro_rules! tags {
    ($(
        $(#[$attr:meta])*
        $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) = $fmt:literal;
    )*) => {$(
        $(#[$attr])*
        #[must_use]
        $vis fn $name($($arg: $ty),*) -> ::std::string::String {
            ::std::format!($fmt)
        }
    )*};
}

/// A placeholder's (or tag expression's) value, wrapped so that method lookup picks
/// [`TagOption`] for an `Option` and [`TagDisplay`] for anything else:
/// `(&&TagArg(&value)).tag_part()`.
#[derive(Debug)]
pub struct TagArg<'a, T: ?Sized>(pub &'a T);

/// What a tag's placeholder can hold: any `Display` value.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be written into a tag: it does not implement `Display`",
    label = "the value written into this tag",
    note = "a placeholder or tag expression takes a `Display` value or an `Option` of one (`None` leaves the whole tag out): name a field that has one (`<user.id>`), or declare a tag function with `cached_query::tags!` that formats the value"
)]
pub trait TagValue {
    /// The text written into the tag.
    fn render(&self) -> String;
}

impl<T: Display + ?Sized> TagValue for T {
    fn render(&self) -> String {
        self.to_string()
    }
}

/// `Option<T>` and `&Option<T>`: `None` drops the tag.
pub trait TagOption<T> {
    /// The value's text, or `None` to leave the tag out.
    fn tag_part(&self) -> Option<String>
    where
        T: TagValue;
}

impl<T> TagOption<T> for &TagArg<'_, Option<T>> {
    fn tag_part(&self) -> Option<String>
    where
        T: TagValue,
    {
        self.0.as_ref().map(TagValue::render)
    }
}

impl<T> TagOption<T> for &TagArg<'_, &Option<T>> {
    fn tag_part(&self) -> Option<String>
    where
        T: TagValue,
    {
        self.0.as_ref().map(TagValue::render)
    }
}

/// Any other value: its `Display`.
pub trait TagDisplay<T: ?Sized> {
    /// The value's text.
    fn tag_part(&self) -> Option<String>
    where
        T: TagValue;
}

impl<T: ?Sized> TagDisplay<T> for TagArg<'_, T> {
    fn tag_part(&self) -> Option<String>
    where
        T: TagValue,
    {
        Some(self.0.render())
    }
}

/// A call's `Ok` value, wrapped so that method lookup picks [`EachOfVec`] for a `Vec`,
/// [`EachOfOption`] for an `Option` and [`EachOfOne`] for anything else: result tags are
/// rendered once per element, `(&&Each(&value)).each()`.
#[derive(Debug)]
pub struct Each<'a, T: ?Sized>(pub &'a T);

/// Each element of a `Vec` (none when empty).
pub trait EachOfVec<'a, U> {
    /// The elements.
    fn each(&self) -> std::slice::Iter<'a, U>;
}

impl<'a, U> EachOfVec<'a, U> for &Each<'a, Vec<U>> {
    fn each(&self) -> std::slice::Iter<'a, U> {
        self.0.iter()
    }
}

/// The value in a `Some` (nothing for `None`).
pub trait EachOfOption<'a, U> {
    /// The value, if any.
    fn each(&self) -> std::option::Iter<'a, U>;
}

impl<'a, U> EachOfOption<'a, U> for &Each<'a, Option<U>> {
    fn each(&self) -> std::option::Iter<'a, U> {
        self.0.iter()
    }
}

/// Any other value, once.
pub trait EachOfOne<'a, T: ?Sized> {
    /// The value itself.
    fn each(&self) -> std::option::IntoIter<&'a T>;
}

impl<'a, T: ?Sized> EachOfOne<'a, T> for Each<'a, T> {
    fn each(&self) -> std::option::IntoIter<&'a T> {
        Some(self.0).into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    // The borrows are what generated code writes: they pick the impl.
    #[allow(clippy::needless_borrow)]
    fn options_drop_the_tag_and_values_render() {
        let (some, none): (Option<u32>, Option<u32>) = (Some(7), None);
        assert_eq!((&&TagArg(&some)).tag_part(), Some("7".to_owned()));
        assert_eq!((&&TagArg(&none)).tag_part(), None);
        let by_ref: &Option<&str> = &Some("a");
        assert_eq!((&&TagArg(&by_ref)).tag_part(), Some("a".to_owned()));
        assert_eq!((&&TagArg(&"x")).tag_part(), Some("x".to_owned()));
        assert_eq!((&&TagArg(&42i64)).tag_part(), Some("42".to_owned()));
    }

    #[test]
    #[allow(clippy::needless_borrow)]
    fn each_looks_through_vec_and_option() {
        let list = vec![1, 2];
        assert_eq!((&&Each(&list)).each().collect::<Vec<_>>(), [&1, &2]);
        let (some, none) = (Some(3), None::<i32>);
        assert_eq!((&&Each(&some)).each().collect::<Vec<_>>(), [&3]);
        assert_eq!((&&Each(&none)).each().count(), 0);
        assert_eq!((&&Each(&4)).each().collect::<Vec<_>>(), [&4]);
    }
}
