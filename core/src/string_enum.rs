//! One mechanism for Accelerate's string-valued enums: each variant has the exact string Accelerate
//! writes (in config files, environment variables and logs). Parsing accepts any ASCII case, because
//! Accelerate itself upper- or lower-cases these values in different places; printing is canonical.

/// Defines an enum whose variants print as, and parse from, fixed strings.
macro_rules! string_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every variant, in Accelerate's declaration order.
            pub const ALL: &'static [$name] = &[ $( $name::$variant, )+ ];

            /// The string Accelerate uses for this variant.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )+
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = $crate::Error;

            fn from_str(s: &str) -> ::std::result::Result<Self, Self::Err> {
                let trimmed = s.trim();
                $name::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str().eq_ignore_ascii_case(trimmed))
                    .ok_or_else(|| $crate::Error::UnknownVariant {
                        kind: stringify!($name),
                        value: s.to_owned(),
                        expected: $name::ALL
                            .iter()
                            .map(|v| v.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                    })
            }
        }

        impl ::serde::Serialize for $name {
            fn serialize<S: ::serde::Serializer>(&self, s: S) -> ::std::result::Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $name {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> ::std::result::Result<Self, D::Error> {
                let s = <::std::borrow::Cow<'de, str> as ::serde::Deserialize>::deserialize(d)?;
                s.parse().map_err(::serde::de::Error::custom)
            }
        }
    };
}

pub(crate) use string_enum;

#[cfg(test)]
mod tests {
    use crate::{
        ComputeEnvironment, DistributedType, DynamoBackend, LoggerType, PrecisionType, RNGType,
        SageMakerDistributedType,
    };

    /// Every variant's string round-trips, in any case, and the whole list is Accelerate's.
    fn round_trip<T>(all: &[T], expected: &[&str])
    where
        T: Copy + std::fmt::Display + std::str::FromStr + PartialEq + std::fmt::Debug,
        <T as std::str::FromStr>::Err: std::fmt::Debug,
    {
        let printed: Vec<String> = all.iter().map(|v| v.to_string()).collect();
        assert_eq!(printed, expected);
        for v in all {
            let s = v.to_string();
            assert_eq!(s.parse::<T>().unwrap(), *v);
            assert_eq!(s.to_ascii_lowercase().parse::<T>().unwrap(), *v);
            assert_eq!(s.to_ascii_uppercase().parse::<T>().unwrap(), *v);
        }
    }

    #[test]
    fn distributed_type_strings() {
        round_trip(
            DistributedType::ALL,
            &[
                "NO",
                "MULTI_CPU",
                "MULTI_GPU",
                "MULTI_NPU",
                "MULTI_MLU",
                "MULTI_SDAA",
                "MULTI_MUSA",
                "MULTI_XPU",
                "DEEPSPEED",
                "FSDP",
                "XLA",
                "MEGATRON_LM",
                "MULTI_HPU",
                "MULTI_NEURON",
            ],
        );
    }

    #[test]
    fn precision_type_strings() {
        round_trip(PrecisionType::ALL, &["no", "fp8", "fp16", "bf16"]);
    }

    #[test]
    fn rng_type_strings() {
        round_trip(
            RNGType::ALL,
            &[
                "torch",
                "cuda",
                "mlu",
                "sdaa",
                "musa",
                "npu",
                "xla",
                "xpu",
                "hpu",
                "neuron",
                "generator",
            ],
        );
    }

    #[test]
    fn logger_type_strings() {
        round_trip(
            LoggerType::ALL,
            &[
                "all",
                "aim",
                "tensorboard",
                "wandb",
                "trackio",
                "comet_ml",
                "mlflow",
                "clearml",
                "dvclive",
                "swanlab",
            ],
        );
    }

    #[test]
    fn compute_environment_and_sagemaker_strings() {
        round_trip(
            ComputeEnvironment::ALL,
            &["LOCAL_MACHINE", "AMAZON_SAGEMAKER"],
        );
        round_trip(
            SageMakerDistributedType::ALL,
            &["NO", "DATA_PARALLEL", "MODEL_PARALLEL"],
        );
    }

    #[test]
    fn dynamo_backend_strings() {
        round_trip(
            DynamoBackend::ALL,
            &[
                "NO",
                "EAGER",
                "AOT_EAGER",
                "INDUCTOR",
                "AOT_TS_NVFUSER",
                "NVPRIMS_NVFUSER",
                "CUDAGRAPHS",
                "OFI",
                "FX2TRT",
                "ONNXRT",
                "TENSORRT",
                "AOT_TORCHXLA_TRACE_ONCE",
                "TORCHXLA_TRACE_ONCE",
                "TVM",
                "HPU_BACKEND",
                "NEURON",
            ],
        );
    }

    #[test]
    fn unknown_variant_names_the_enum_and_the_choices() {
        let err = "fp32".parse::<PrecisionType>().unwrap_err().to_string();
        assert!(err.contains("PrecisionType"), "{err}");
        assert!(err.contains("\"fp32\""), "{err}");
        assert!(err.contains("no, fp8, fp16, bf16"), "{err}");
    }

    #[test]
    fn serde_uses_the_same_strings() {
        let json = serde_json::to_string(&DistributedType::MultiGpu).unwrap();
        assert_eq!(json, "\"MULTI_GPU\"");
        let back: PrecisionType = serde_json::from_str("\"BF16\"").unwrap();
        assert_eq!(back, PrecisionType::Bf16);
        let bad = serde_json::from_str::<PrecisionType>("\"half\"").unwrap_err();
        assert!(bad.to_string().contains("PrecisionType"));
    }
}
