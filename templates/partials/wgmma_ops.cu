{#- Tera macros rendering the wgmma.mma_async wrappers of the wgmma kernels
    (templates/prefill_sm90.cu, backward_dqdkdv_sm90.cu; imported as `ops`). Each renders one
    __device__ function `name` that issues one m64n<n>k16 product into the f32 accumulator
    `float (&d)[acc][4]` (`tiles` = n / 8 fragments; the fragment layout is mma.sync's m16n8
    per warp), element type `dtype`:
    - ss: A and B from shared memory by descriptor, `trans_a` / `trans_b` 0 = K-major,
      1 = MN-major; with `pred`, an `int accumulate` argument whose 0 overwrites d, else d is
      always accumulated.
    - rs: A from registers (mma.sync's A fragment, four packed pairs), B from shared memory,
      MN-major; always accumulates. -#}
{% macro ss(name, acc, n, tiles, dtype, trans_a, trans_b, pred) -%}
__device__ __forceinline__ void {{ name }}(float (&d)[{{ acc }}][4], unsigned long long desc_a,
                                         unsigned long long desc_b{% if pred %}, int accumulate{% endif %}) {
    asm volatile(
        "{\n{% if pred %}.reg .pred p;\nsetp.ne.b32 p, %{{ 4 * tiles + 2 }}, 0;\n{% endif %}"
        "wgmma.mma_async.sync.aligned.m64n{{ n }}k16.f32.{{ dtype }}.{{ dtype }} "
        "{ {% for i in range(end=4 * tiles) %}%{{ i }}{% if not loop.last %}, {% endif %}{% endfor %} }, "
        "%{{ 4 * tiles }}, %{{ 4 * tiles + 1 }}, {% if pred %}p{% else %}1{% endif %}, 1, 1, {{ trans_a }}, {{ trans_b }};\n}\n"
        : {% for j in range(end=tiles) %}"+f"(d[{{ j }}][0]), "+f"(d[{{ j }}][1]), "+f"(d[{{ j }}][2]), "+f"(d[{{ j }}][3]){% if not loop.last %},
          {% endif %}{% endfor %}
        : "l"(desc_a), "l"(desc_b){% if pred %}, "r"(accumulate){% endif %});
}
{%- endmacro ss %}
{% macro rs(name, acc, n, tiles, dtype) -%}
__device__ __forceinline__ void {{ name }}(float (&d)[{{ acc }}][4], const unsigned (&a)[4], unsigned long long desc_b) {
    asm volatile(
        "{\n"
        "wgmma.mma_async.sync.aligned.m64n{{ n }}k16.f32.{{ dtype }}.{{ dtype }} "
        "{ {% for i in range(end=4 * tiles) %}%{{ i }}{% if not loop.last %}, {% endif %}{% endfor %} }, "
        "{ %{{ 4 * tiles }}, %{{ 4 * tiles + 1 }}, %{{ 4 * tiles + 2 }}, %{{ 4 * tiles + 3 }} }, "
        "%{{ 4 * tiles + 4 }}, 1, 1, 1, 1;\n}\n"
        : {% for j in range(end=tiles) %}"+f"(d[{{ j }}][0]), "+f"(d[{{ j }}][1]), "+f"(d[{{ j }}][2]), "+f"(d[{{ j }}][3]){% if not loop.last %},
          {% endif %}{% endfor %}
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b));
}
{%- endmacro rs %}
