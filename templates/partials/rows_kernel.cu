// ---------------------------------------------------------------------------------------
// The opening of the one-warp-per-row kernels (prefill_rows.cu, decode_rows.cu,
// decode_rows_paged.cu): the partials they use, BLOCK_ROWS (query rows, one warp each, per
// block) and the kernel's signature (one `const FwdParams p`) up to the body's brace.
// ---------------------------------------------------------------------------------------
{% include "partials/types.cu" %}
{% include "partials/mask.cu" %}
{% include "partials/attend.cu" %}
{% include "partials/params.cu" %}

constexpr int BLOCK_ROWS = {{ block_rows }};

extern "C" __global__ void __launch_bounds__(BLOCK_ROWS * WARP_SIZE) {{ key }}(const FwdParams p)
{
