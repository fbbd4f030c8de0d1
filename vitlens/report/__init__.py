"""Results → the paper's tables and figures.

- `results.open_results(dir)`: DuckDB connection with one view per table of the store
- `queries`: the SQL files of queries/ (`list_queries`, `find_query`, `run_query`, formatting)
- `statistics`: the paper's tests on stats-query results (Wilcoxon vs twin, permutation tests)
- `figures`: matplotlib figures per query (`FIGURES`, `draw_figure`)
- `sections`: what fills each section (the reason an empty one gives); `provenance`: runs, data, rejects
- `gallery` (+ `gallery_select`, `gallery_draw`, `image_source`): per-image token and explain maps
- `html`: one HTML page and one Markdown file from report sections
- `build.build_report(results, out, gallery=...)`: everything above into one folder with index.html
"""
