# Install flowerbed into .venv from this kit's wheels\ (Windows PowerShell), without any package index:
# with uv when the kit carries its wheel (several times faster), else with pip.
$ErrorActionPreference = "Stop"
Set-Location -Path $PSScriptRoot
$wheel = (Get-Item flowerbed-*.whl | Select-Object -First 1).FullName
py -3.11 -m venv .venv
$uv = $false
if (Get-ChildItem wheels\uv-*.whl -ErrorAction SilentlyContinue) {
    & .venv\Scripts\pip install --quiet --no-index --find-links wheels uv
    $uv = ($LASTEXITCODE -eq 0)
}
if ($uv) {
    Write-Output "installing with uv, from wheels\"
    & .venv\Scripts\uv pip install --python .venv\Scripts\python.exe --no-index --find-links wheels --link-mode copy -r wheels\requirements.txt $wheel
} else {
    Write-Output "no uv in wheels\: installing with pip, from wheels\ (a few minutes)"
    & .venv\Scripts\pip install --no-index --find-links wheels -r wheels\requirements.txt $wheel
}
if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }
Write-Output "installed flowerbed in .venv; start with .\start-supernode.ps1"
