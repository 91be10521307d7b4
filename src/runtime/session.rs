//! One ONNX Runtime session behind a small, typed surface: ports read once at
//! load, inputs converted to the float type a port declares, outputs widened
//! back to f32, and bindings that several threads may run at once.
//!
//! Exports of one model differ in their interface (the diffusers script feeds
//! int32 ids where optimum feeds int64; fp16 exports take and return fp16;
//! a timestep may be a scalar or a batch), so every caller works with f32 and
//! this module converts to and from what the file declares.

use std::ffi::CStr;
use std::fmt;
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, ArrayViewD};
use ort::AsPointer;
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};

use super::SessionError;

/// The element types time-onnx feeds and reads; everything else is `Other`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElementType {
    /// float32.
    F32,
    /// float16.
    F16,
    /// float64.
    F64,
    /// int32.
    I32,
    /// int64.
    I64,
    /// bool.
    Bool,
    /// Any other tensor element type.
    Other,
}

impl ElementType {
    fn of(ty: TensorElementType) -> Self {
        match ty {
            TensorElementType::Float32 => Self::F32,
            TensorElementType::Float16 => Self::F16,
            TensorElementType::Float64 => Self::F64,
            TensorElementType::Int32 => Self::I32,
            TensorElementType::Int64 => Self::I64,
            TensorElementType::Bool => Self::Bool,
            _ => Self::Other,
        }
    }

    fn ort(self) -> Option<TensorElementType> {
        Some(match self {
            Self::F32 => TensorElementType::Float32,
            Self::F16 => TensorElementType::Float16,
            Self::F64 => TensorElementType::Float64,
            Self::I32 => TensorElementType::Int32,
            Self::I64 => TensorElementType::Int64,
            Self::Bool => TensorElementType::Bool,
            Self::Other => return None,
        })
    }

    /// f32, f16 or f64.
    pub fn is_float(self) -> bool {
        matches!(self, Self::F32 | Self::F16 | Self::F64)
    }
}

impl fmt::Display for ElementType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::F64 => "float64",
            Self::I32 => "int32",
            Self::I64 => "int64",
            Self::Bool => "bool",
            Self::Other => "another element type",
        })
    }
}

/// A graph input or output as the session reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    /// Its name.
    pub name: String,
    /// Its element type; `None` when it is not a tensor (a sequence, a map).
    pub ty: Option<ElementType>,
    /// Its declared dims, -1 where dynamic (empty for a scalar).
    pub dims: Vec<i64>,
}

impl Port {
    fn of(outlet: &ort::value::Outlet) -> Self {
        let (ty, dims) = match outlet.dtype() {
            ValueType::Tensor { ty, shape, .. } => (Some(ElementType::of(*ty)), shape.to_vec()),
            _ => (None, Vec::new()),
        };
        Self {
            name: outlet.name().to_string(),
            ty,
            dims,
        }
    }
}

/// A tensor handed to or returned by a session.
pub struct Value(DynValue);

/// A loaded model, with its interface read once.
pub struct Session {
    path: PathBuf,
    inner: ort::session::Session,
    inputs: Vec<Port>,
    outputs: Vec<Port>,
}

impl Session {
    pub(super) fn new(path: &Path, inner: ort::session::Session) -> Self {
        let inputs = inner.inputs().iter().map(Port::of).collect();
        let outputs = inner.outputs().iter().map(Port::of).collect();
        Self {
            path: path.to_path_buf(),
            inner,
            inputs,
            outputs,
        }
    }

    /// The model file (for an in-memory model, the file it came from).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every input, in graph order.
    pub fn inputs(&self) -> &[Port] {
        &self.inputs
    }

    /// Every output, in graph order.
    pub fn outputs(&self) -> &[Port] {
        &self.outputs
    }

    /// The input called `name`.
    pub fn input(&self, name: &str) -> Option<&Port> {
        self.inputs.iter().find(|p| p.name == name)
    }

    /// The input called `name`, which must be a tensor; `role` names the
    /// model in the error ("the UNet").
    pub fn tensor_input(&self, name: &str, role: &str) -> Result<&Port, SessionError> {
        self.input(name)
            .filter(|p| p.ty.is_some())
            .ok_or_else(|| self.interface(format!("{role} has no tensor input {name:?}")))
    }

    /// The input called `preferred`, else the first one: exports that name
    /// their ports differently still work.
    pub fn input_or_first(&self, preferred: &str, role: &str) -> Result<&Port, SessionError> {
        named_or_first(&self.inputs, preferred)
            .ok_or_else(|| self.interface(format!("{role} has no inputs")))
    }

    /// The output called `preferred`, else the first one.
    pub fn output_or_first(&self, preferred: &str, role: &str) -> Result<&Port, SessionError> {
        named_or_first(&self.outputs, preferred)
            .ok_or_else(|| self.interface(format!("{role} has no outputs")))
    }

    /// An error about this model's interface.
    pub fn interface(&self, why: impl Into<String>) -> SessionError {
        interface_error(&self.path, why)
    }

    fn ort_error(&self, source: ort::Error) -> SessionError {
        ort_error(&self.path, source)
    }

    /// `a` as a value for the float input `name`, converted to the type the
    /// input declares (f32, f16 or f64).
    pub fn float_value(&self, name: &str, a: ArrayViewD<f32>) -> Result<Value, SessionError> {
        let ty = self.input(name).and_then(|p| p.ty);
        match ty {
            Some(ty) if ty.is_float() => float_tensor(ty, a).map_err(|e| self.ort_error(e)),
            _ => Err(self.interface(format!("input {name:?} is not a float tensor"))),
        }
    }

    /// Integers of `shape` as a value for the int32 or int64 input `name`.
    pub fn int_value(
        &self,
        name: &str,
        shape: &[usize],
        values: Vec<i64>,
    ) -> Result<Value, SessionError> {
        let ty = self.input(name).and_then(|p| p.ty);
        let value = match ty {
            Some(ElementType::I32) => {
                let v: Vec<i32> = values.into_iter().map(|x| x as i32).collect();
                Tensor::from_array((shape.to_vec(), v)).map(Tensor::into_dyn)
            }
            Some(ElementType::I64) => {
                Tensor::from_array((shape.to_vec(), values)).map(Tensor::into_dyn)
            }
            _ => return Err(self.interface(format!("input {name:?} is not an integer tensor"))),
        };
        value.map(Value).map_err(|e| self.ort_error(e))
    }

    /// An f32 array as a value, whatever the ports declare (for models whose
    /// inputs are float32 by definition, e.g. preprocessed pixels).
    pub fn f32_value(&self, a: ArrayD<f32>) -> Result<Value, SessionError> {
        Tensor::from_array(a)
            .map(|t| Value(t.into_dyn()))
            .map_err(|e| self.ort_error(e))
    }

    /// An i64 array as a value.
    pub fn i64_value(&self, a: ArrayD<i64>) -> Result<Value, SessionError> {
        Tensor::from_array(a)
            .map(|t| Value(t.into_dyn()))
            .map_err(|e| self.ort_error(e))
    }

    /// A buffer for output `name` of `shape`, in the type it declares, in
    /// this session's memory: where a [`Binding`] writes.
    pub fn output_buffer(&self, name: &str, shape: Vec<usize>) -> Result<Value, SessionError> {
        let ty = self
            .outputs
            .iter()
            .find(|p| p.name == name)
            .and_then(|p| p.ty)
            .and_then(ElementType::ort)
            .ok_or_else(|| self.interface(format!("output {name:?} is not a tensor")))?;
        ort::value::DynTensor::new(self.inner.allocator(), ty, shape)
            .map(|t| Value(t.into_dyn()))
            .map_err(|e| self.ort_error(e))
    }

    /// Runs the model on `inputs` (name, value).
    pub fn run(&mut self, inputs: &[(&str, &Value)]) -> Result<Outputs<'_>, SessionError> {
        let list: Vec<(String, ort::session::SessionInputValue<'_>)> = inputs
            .iter()
            .map(|(name, v)| (name.to_string(), (&v.0).into()))
            .collect();
        let path = self.path.clone();
        self.inner
            .run(list)
            .map(|o| Outputs { path, inner: o })
            .map_err(|source| ort_error(&self.path, source))
    }

    /// A new binding: inputs bound once and reused across runs, outputs
    /// written where asked.
    pub fn binding(&self) -> Result<Binding, SessionError> {
        self.inner
            .create_binding()
            .map(|inner| Binding {
                inner,
                output: None,
            })
            .map_err(|e| self.ort_error(e))
    }

    /// Binds output `name` of `binding` to memory ONNX Runtime allocates at
    /// each run (read it from the run's [`Outputs`]).
    pub fn bind_output_to_session(
        &self,
        binding: &mut Binding,
        name: &str,
    ) -> Result<(), SessionError> {
        let mem = self.inner.allocator().memory_info();
        binding
            .inner
            .bind_output_to_device(name, mem)
            .map_err(|e| self.ort_error(e))
    }

    /// Binds input `name` of `binding` to `value`.
    pub fn bind_input(
        &self,
        binding: &mut Binding,
        name: &str,
        value: &Value,
    ) -> Result<(), SessionError> {
        binding
            .inner
            .bind_input(name, &value.0)
            .map_err(|e| self.ort_error(e))
    }

    /// Binds output `name` of `binding` to `buffer` (from
    /// [`Self::output_buffer`]), which the binding keeps: read it with
    /// [`Binding::output`] after a run.
    pub fn bind_output(
        &self,
        binding: &mut Binding,
        name: &str,
        mut buffer: Value,
    ) -> Result<(), SessionError> {
        binding
            .inner
            .bind_output(name, &mut buffer.0)
            .map_err(|e| self.ort_error(e))?;
        binding.output = Some(buffer);
        Ok(())
    }

    /// Runs `binding` once.
    pub fn run_binding<'b>(
        &'b mut self,
        binding: &'b Binding,
    ) -> Result<Outputs<'b>, SessionError> {
        let path = self.path.clone();
        self.inner
            .run_binding(&binding.inner)
            .map(|o| Outputs { path, inner: o })
            .map_err(|source| ort_error(&self.path, source))
    }

    /// Runs every binding at once, one thread each, and waits for all; their
    /// outputs are in the buffers bound with [`Self::bind_output`].
    ///
    /// ONNX Runtime documents `Run` as safe to call from several threads on
    /// one session (each call with its own binding); ort exposes runs only
    /// through `&mut Session`, so these go through the C API.
    pub fn run_concurrently(&self, bindings: &[Binding]) -> Result<(), SessionError> {
        /// Pointers handed to the run threads; the session and bindings
        /// outlive the scope that joins them.
        #[derive(Clone, Copy)]
        struct Run(*mut ort::sys::OrtSession, *const ort::sys::OrtIoBinding);
        // SAFETY: see the function's doc; nothing else touches the bindings
        // while the scope runs.
        unsafe impl Send for Run {}
        fn run(r: Run) -> Result<(), ort::Error> {
            let api = ort::api();
            // SAFETY: both pointers are live (see `Run`); a non-null status
            // is ours to read and release.
            unsafe {
                let status = (api.RunWithBinding)(r.0, std::ptr::null(), r.1);
                if status.0.is_null() {
                    return Ok(());
                }
                let message = CStr::from_ptr((api.GetErrorMessage)(status.0))
                    .to_string_lossy()
                    .into_owned();
                (api.ReleaseStatus)(status.0);
                Err(ort::Error::new(message))
            }
        }
        let Some((first, rest)) = bindings
            .iter()
            .map(|b| Run(self.inner.ptr().cast_mut(), b.inner.ptr()))
            .collect::<Vec<_>>()
            .split_first()
            .map(|(f, r)| (*f, r.to_vec()))
        else {
            return Ok(());
        };
        std::thread::scope(|scope| {
            let others: Vec<_> = rest
                .into_iter()
                .map(|r| scope.spawn(move || run(r)))
                .collect();
            let first = run(first);
            others
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(ort::Error::new("a run thread panicked")))
                })
                .fold(first, Result::and)
        })
        .map_err(|e| self.ort_error(e))
    }
}

fn interface_error(path: &Path, why: impl Into<String>) -> SessionError {
    SessionError::Interface {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

fn ort_error(path: &Path, source: ort::Error) -> SessionError {
    SessionError::Ort {
        path: path.to_path_buf(),
        source,
    }
}

fn named_or_first<'a>(ports: &'a [Port], preferred: &str) -> Option<&'a Port> {
    ports
        .iter()
        .find(|p| p.name == preferred)
        .or_else(|| ports.first())
}

/// Inputs bound once for many runs, and the output buffer they write into.
pub struct Binding {
    inner: ort::session::IoBinding,
    output: Option<Value>,
}

impl Binding {
    /// The buffer bound with [`Session::bind_output`], if any.
    pub fn output(&self) -> Option<&Value> {
        self.output.as_ref()
    }
}

/// What one run returned, by output name.
pub struct Outputs<'s> {
    path: PathBuf,
    inner: ort::session::SessionOutputs<'s>,
}

impl Outputs<'_> {
    fn get(&self, name: &str) -> Result<&DynValue, SessionError> {
        self.inner
            .get(name)
            .ok_or_else(|| self.interface(format!("the run gave no output {name:?}")))
    }

    /// An error about the model's interface (see [`Session::interface`]).
    pub fn interface(&self, why: impl Into<String>) -> SessionError {
        interface_error(&self.path, why)
    }

    fn ort_error(&self, source: ort::Error) -> SessionError {
        ort_error(&self.path, source)
    }

    /// Float output `name` (f32, f16 or f64) as f32.
    pub fn float(&self, name: &str) -> Result<ArrayD<f32>, SessionError> {
        float_array(self.get(name)?).map_err(|e| self.ort_error(e))
    }

    /// Bool output `name`.
    pub fn bools(&self, name: &str) -> Result<ArrayD<bool>, SessionError> {
        self.get(name)?
            .try_extract_array::<bool>()
            .map(|a| a.to_owned())
            .map_err(|e| self.ort_error(e))
    }

    /// Takes output `name` out, to feed it to another run.
    pub fn take(&mut self, name: &str) -> Result<Value, SessionError> {
        match self.inner.remove(name) {
            Some(v) => Ok(Value(v)),
            None => Err(self.interface(format!("the run gave no output {name:?}"))),
        }
    }
}

impl Value {
    /// A float value (f32, f16 or f64) as f32; errors name `session`'s model.
    pub fn to_f32(&self, session: &Session) -> Result<ArrayD<f32>, SessionError> {
        float_array(&self.0).map_err(|e| session.ort_error(e))
    }
}

/// An f32 array as a tensor of the float type `ty`.
fn float_tensor(ty: ElementType, a: ArrayViewD<f32>) -> Result<Value, ort::Error> {
    Ok(Value(match ty {
        ElementType::F16 => Tensor::from_array(a.mapv(half::f16::from_f32))?.into_dyn(),
        ElementType::F64 => Tensor::from_array(a.mapv(f64::from))?.into_dyn(),
        _ => Tensor::from_array(a.to_owned())?.into_dyn(),
    }))
}

/// A float tensor (f32, f16 or f64) as f32.
fn float_array(v: &DynValue) -> Result<ArrayD<f32>, ort::Error> {
    if let Ok(a) = v.try_extract_array::<f32>() {
        return Ok(a.to_owned());
    }
    if let Ok(a) = v.try_extract_array::<half::f16>() {
        return Ok(a.mapv(half::f16::to_f32));
    }
    Ok(v.try_extract_array::<f64>()?.mapv(|x| x as f32))
}
